"""Engines: the distributed filesystems fusecsi drives, behind one seam (see base.py).

Each engine is a package `fusecsi/engines/<name>/` whose `__init__` defines
`NODE: NodeEngine` (mountd's half) and `open_namespace(cluster, *, timeout) -> Namespace`
(the controller's half); an engine that can run on one machine has a `local` module whose
`LocalBackend(root, workers)` starts it there (`fusecsi dev --engine`, tests, benchmarks).
Packages are imported only when used, so a role pays only for the engines it serves.
"""

from __future__ import annotations

import importlib

from fusecsi.engines.base import BadParameter, Cluster, Namespace, NodeEngine

NAMES = ("embedded", "juicefs", "seaweedfs", "curvine")
DEFAULT = "embedded"


def _package(name: str):
    if name not in NAMES:
        raise BadParameter(f"unknown engine {name!r} (known: {', '.join(NAMES)})")
    return importlib.import_module(f"fusecsi.engines.{name}")


def node_engine(name: str) -> NodeEngine:
    return _package(name).NODE


def open_namespace(cluster: Cluster, *, timeout: float) -> Namespace:
    return _package(cluster.engine).open_namespace(cluster, timeout=timeout)


def local_cluster(name: str, root, workers: int = 2):
    """A context manager running a cluster of engine `name` on this machine, with
    `.parameters` and `.secrets` (what a StorageClass and its CSI secret would hold) and
    `.describe()`; BadParameter when the engine cannot run here."""
    _package(name)
    try:
        local = importlib.import_module(f"fusecsi.engines.{name}.local")
    except ModuleNotFoundError as exc:
        if exc.name != f"fusecsi.engines.{name}.local":
            raise
        raise BadParameter(
            f"the {name} engine has no cluster that runs on one machine: "
            "point a StorageClass at a real one"
        ) from None
    return local.LocalBackend(root, workers=workers)
