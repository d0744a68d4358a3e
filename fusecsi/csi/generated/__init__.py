"""Generated CSI v1 stubs (see scripts/gen_stubs.py)."""
