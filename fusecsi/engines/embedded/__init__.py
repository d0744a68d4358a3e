"""The embedded cluster (fusecsi's own master and workers): the default engine."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fusecsi.engines.embedded.node import EmbeddedNode

if TYPE_CHECKING:
    from fusecsi.engines.base import Cluster, Namespace

NODE = EmbeddedNode()


def open_namespace(cluster: Cluster, *, timeout: float) -> Namespace:
    from fusecsi.engines.embedded.namespace import EmbeddedNamespace

    return EmbeddedNamespace(cluster, timeout=timeout)
