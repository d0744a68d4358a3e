"""The FUSE daemon (`fusecsi mount`): one pyfuse3 session serving one cluster subtree."""
