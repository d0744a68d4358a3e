"""SeaweedFS: filers name the cluster, `weed mount` serves a key, the filer's HTTP API is the
controller's namespace. SeaweedFS has no directory quota: capacity is recorded on the
volume's directory, not enforced (docs/engines/seaweedfs.md)."""

from __future__ import annotations

from fusecsi.engines.base import Cluster, Namespace
from fusecsi.engines.seaweedfs.namespace import FilerNamespace
from fusecsi.engines.seaweedfs.node import SeaweedNode

NODE = SeaweedNode()


def open_namespace(cluster: Cluster, *, timeout: float) -> Namespace:
    return FilerNamespace(cluster, timeout=timeout)
