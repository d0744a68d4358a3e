"""The embedded engine's cluster on this machine (`fusecsi dev`, tests, benchmarks)."""

from __future__ import annotations

from pathlib import Path

from fusecsi.cluster.local import LocalCluster


class LocalBackend:
    """A master and `workers` workers under `root`, as real processes on loopback."""

    def __init__(self, root: Path, workers: int = 2) -> None:
        self.cluster = LocalCluster(root, workers=workers)
        self.workers = workers
        self.parameters: dict[str, str] = {}
        self.secrets: dict[str, str] = {}

    def __enter__(self) -> LocalBackend:
        self.cluster.__enter__()
        self.parameters = {"master-addrs": self.cluster.master_addrs}
        return self

    def __exit__(self, *exc) -> None:
        self.cluster.__exit__(*exc)

    def describe(self) -> str:
        return f"master and {self.workers} workers at {self.cluster.master_addrs}"
