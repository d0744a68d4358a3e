"""The CSI node role: `fusecsi node` (main), NodeService (service)."""
