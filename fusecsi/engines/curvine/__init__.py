"""Curvine (CurvineIO/curvine): volumes as directories of a Curvine cluster, mounted by
its own `curvine-fuse`; the controller talks to the masters over Curvine's RPC
(framing.py, client.py, the messages in proto/curvine/). No quota: sizes are recorded."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fusecsi.engines.curvine.node import CurvineNode

if TYPE_CHECKING:
    from fusecsi.engines.base import Cluster, Namespace

NODE = CurvineNode()


def open_namespace(cluster: Cluster, *, timeout: float) -> Namespace:
    from fusecsi.engines.curvine.namespace import CurvineNamespace

    return CurvineNamespace(cluster, timeout=timeout)
