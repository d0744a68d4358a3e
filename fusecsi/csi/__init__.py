"""The CSI roles: Identity, Controller and Node services, their gRPC server and the trio/asyncio bridge."""
