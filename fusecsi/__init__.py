"""fusecsi: persistent volumes for Kubernetes on a Curvine-style filesystem through FUSE."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fusecsi")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

DRIVER_NAME = "csi.fusecsi.io"
