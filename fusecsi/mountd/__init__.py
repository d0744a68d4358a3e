"""The node's mount supervisor: shared, reference-counted, self-healing FUSE daemons."""
