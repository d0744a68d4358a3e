"""The version of mountd's control API (fusecsi/mountd/api.py), shared with its client so
the node plugin need not import the supervisor."""

VERSION = 2  # 1: positional arguments, before named fields
