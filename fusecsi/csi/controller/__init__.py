"""The CSI controller role: `fusecsi controller` (main), ControllerService (service)."""
