"""A FAKE engine for the controller's table-driven tests: an in-memory directory tree behind
the Namespace interface (fusecsi/engines/base.py).

Why a fake: the controller's rules must hold for every engine, including states no real
engine here can be put into on demand — a `mkdir_tagged` that is not atomic and stops
between its steps, quotas that are recorded but not enforced, a cluster that stops
answering between two calls. The real-process tests (test_controller.py,
test_controller_faults.py) drive the embedded cluster itself; this fake only stands in
for "some engine" and keeps the semantics the seam documents (errnos, EEXIST on a taken
name, rename without replace, mkdir_tagged durable when it answers, the rest only after
sync).
"""

from __future__ import annotations

import errno
from collections.abc import Mapping
from dataclasses import dataclass, field

import trio

from fusecsi.engines.base import BadParameter, Cluster, Node, Unreachable
from fusecsi.engines.embedded import NODE as EMBEDDED_NODE


@dataclass
class Entry:
    is_dir: bool
    mode: int = 0o755
    tags: dict[bytes, bytes] = field(default_factory=dict)
    quota: int | None = None
    size: int = 0  # files only


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] or "/"


class FakeTree:
    """One fake cluster's namespace and its knobs; shared by every Namespace opened on it."""

    def __init__(self, *, atomic: bool = True, quota_enforced: bool = True) -> None:
        self.entries: dict[str, Entry] = {"/": Entry(True)}
        self.atomic = atomic
        self.quota_enforced = quota_enforced
        self.free_bytes = 100 << 30
        self.unreachable = False
        self.hang = False  # every call waits forever (the caller's deadline must fire)
        # non-atomic mkdir_tagged: the next one stops (EIO) after this many of its steps
        # (0: right after the mkdir; 1: after the first tag; ...)
        self.stop_after_steps: int | None = None
        self.open_fails: OSError | None = None  # what opening a Namespace raises
        self.refuse: dict[str, int] = {}  # method -> errno its next call fails with
        self.unsynced = 0  # changes acknowledged but not yet synced
        self.calls: list[str] = []
        self.opened_with: list[Mapping[str, str]] = []  # secrets of each Namespace opened

    # -- test helpers ----------------------------------------------------------------------

    def add_dir(self, path: str, tags: Mapping[bytes, bytes] | None = None) -> None:
        """A directory someone made (with its missing parents, untagged)."""
        self._parents(path)
        self.entries[path] = Entry(True, tags=dict(tags or {}))

    def add_file(self, path: str, size: int = 4) -> None:
        self._parents(path)
        self.entries[path] = Entry(False, 0o644, size=size)

    def _parents(self, path: str) -> None:
        above = _parent(path)
        while above not in self.entries:
            self.entries[above] = Entry(True)
            above = _parent(above)

    def names(self, path: str) -> list[str]:
        """The names in the directory `path`."""
        prefix = path.rstrip("/") + "/"
        return sorted(p[len(prefix) :] for p in self._below(path) if "/" not in p[len(prefix) :])

    def snapshot(self) -> dict:
        return {
            p: (e.is_dir, dict(e.tags), e.quota, e.size) for p, e in sorted(self.entries.items())
        }

    # -- internals -------------------------------------------------------------------------

    def _need_dir(self, path: str) -> Entry:
        entry = self.entries.get(path)
        if entry is None:
            above = _parent(path)
            while above != "/" and above not in self.entries:
                above = _parent(above)
            if above in self.entries and not self.entries[above].is_dir:
                raise OSError(errno.ENOTDIR, f"{above} is not a directory")
            raise OSError(errno.ENOENT, f"{path}: no such directory")
        if not entry.is_dir:
            raise OSError(errno.ENOTDIR, f"{path} is not a directory")
        return entry

    def _need(self, path: str) -> Entry:
        entry = self.entries.get(path)
        if entry is None:
            raise OSError(errno.ENOENT, f"{path}: no such entry")
        return entry

    def _below(self, path: str) -> list[str]:
        """Every path inside the directory `path` (not itself)."""
        prefix = path.rstrip("/") + "/"
        return [p for p in self.entries if p.startswith(prefix) and p != path]


class FakeNamespace:
    """The Namespace interface on a FakeTree."""

    def __init__(self, tree: FakeTree, cluster: Cluster) -> None:
        self.tree = tree
        self.cluster = cluster
        self.quota_enforced = tree.quota_enforced

    async def __aenter__(self) -> FakeNamespace:
        if self.tree.open_fails is not None:  # e.g. an engine's private mount not coming up
            raise self.tree.open_fails
        self.tree.opened_with.append(dict(self.cluster.secrets))
        return self

    async def __aexit__(self, *exc) -> None:
        pass

    async def _enter(self, name: str) -> FakeTree:
        tree = self.tree
        await trio.lowlevel.checkpoint()
        tree.calls.append(name)
        if tree.hang:
            await trio.sleep_forever()
        if tree.unreachable:
            raise Unreachable(f"no server of {self.cluster.address} answered {name}")
        if name in tree.refuse:
            raise OSError(tree.refuse.pop(name), f"{name} refused by the engine")
        return tree

    def _changed(self) -> None:
        self.tree.unsynced += 1

    async def lookup(self, path: str) -> Node | None:
        tree = await self._enter("lookup")
        entry = tree.entries.get(path)
        return None if entry is None else Node(path, entry.is_dir)

    async def listdir(self, path: str) -> list[Node]:
        tree = await self._enter("listdir")
        tree._need_dir(path)
        return [
            Node(f"{path.rstrip('/')}/{n}", tree.entries[f"{path.rstrip('/')}/{n}"].is_dir)
            for n in tree.names(path)
        ]

    async def mkdirs(self, path: str) -> None:
        tree = await self._enter("mkdirs")
        parts = path.strip("/").split("/") if path != "/" else []
        here = ""
        for part in parts:
            here += "/" + part
            entry = tree.entries.get(here)
            if entry is None:
                tree.entries[here] = Entry(True)
                self._changed()
            elif not entry.is_dir:
                raise OSError(errno.ENOTDIR, f"{here} is not a directory")

    async def mkdir_tagged(
        self, path: str, mode: int, tags: Mapping[bytes, bytes], quota_bytes: int | None
    ) -> None:
        tree = await self._enter("mkdir_tagged")
        tree._need_dir(_parent(path))
        if path in tree.entries:
            raise OSError(errno.EEXIST, f"{path} exists")
        if tree.atomic:
            tree.entries[path] = Entry(True, mode, dict(tags), quota_bytes)
            return  # durable when it answers, as the seam says
        # not atomic: mkdir, then each tag, then the quota — each a step that may be the last
        steps = [
            lambda: None,
            *[(lambda k=k, v=v: entry.tags.__setitem__(k, v)) for k, v in tags.items()],
        ]
        if quota_bytes is not None:
            steps.append(lambda: setattr(entry, "quota", quota_bytes))
        entry = Entry(True, mode)
        tree.entries[path] = entry
        for done, step in enumerate(steps):
            step()
            if tree.stop_after_steps == done:
                tree.stop_after_steps = None
                raise OSError(errno.EIO, f"{path}: the engine stopped after step {done}")

    async def get_tag(self, path: str, name: bytes) -> bytes | None:
        tree = await self._enter("get_tag")
        return tree._need(path).tags.get(name)

    async def set_tag(self, path: str, name: bytes, value: bytes) -> None:
        tree = await self._enter("set_tag")
        tree._need(path).tags[name] = value
        self._changed()

    async def remove_tag(self, path: str, name: bytes) -> None:
        tree = await self._enter("remove_tag")
        tags = tree._need(path).tags
        if name not in tags:
            raise OSError(errno.ENODATA, f"{path}: no tag {name!r}")
        del tags[name]
        self._changed()

    async def get_quota(self, path: str) -> int | None:
        tree = await self._enter("get_quota")
        return tree._need_dir(path).quota

    async def set_quota(self, path: str, max_bytes: int) -> None:
        tree = await self._enter("set_quota")
        tree._need_dir(path).quota = max_bytes
        self._changed()

    async def rename(self, src: str, dst: str) -> None:
        tree = await self._enter("rename")
        tree._need(src)
        tree._need_dir(_parent(dst))
        if dst in tree.entries:
            raise OSError(errno.EEXIST, f"{dst} exists")
        for old in [src, *tree._below(src)]:
            tree.entries[dst + old[len(src) :]] = tree.entries.pop(old)
        self._changed()

    async def rmdir(self, path: str) -> None:
        tree = await self._enter("rmdir")
        tree._need_dir(path)
        if tree._below(path):
            raise OSError(errno.ENOTEMPTY, f"{path} is not empty")
        del tree.entries[path]
        self._changed()

    async def remove_tree(self, path: str) -> None:
        tree = await self._enter("remove_tree")
        for gone in [*tree._below(path), path]:
            tree.entries.pop(gone, None)
        self._changed()

    async def sync(self) -> None:
        tree = await self._enter("sync")
        tree.unsynced = 0

    async def capacity(self, path: str) -> int:
        tree = await self._enter("capacity")
        free = tree.free_bytes
        if not tree.quota_enforced:
            return free  # recorded quotas bound nothing
        here = path
        while True:
            entry = tree.entries.get(here)
            if entry is not None and entry.quota is not None:
                used = sum(tree.entries[p].size for p in tree._below(here))
                return min(free, max(0, entry.quota - used))
            if here == "/":
                return free
            here = _parent(here)


class _FakeNode:
    """The node half's parse_cluster for the fake in the slot of another engine: parameter
    `filer` names the cluster, every secret is passed on."""

    cluster_parameters = ("filer",)

    def __init__(self, name: str) -> None:
        self.name = name

    def check_options(self, options: Mapping[str, str]) -> None:
        if set(options) - {"cache-size"}:
            name = sorted(set(options) - {"cache-size"})[0]
            raise BadParameter(f"{self.name} mount option {name!r} is not allowed")

    def parse_cluster(self, parameters: Mapping[str, str], secrets: Mapping[str, str]) -> Cluster:
        unknown = sorted(set(parameters) - {"filer"})
        if unknown:
            raise BadParameter(f"unknown {self.name} parameter {unknown[0]!r} (allowed: filer)")
        if "filer" not in parameters:
            raise BadParameter(f"parameter filer is required for engine {self.name}")
        return Cluster(self.name, parameters["filer"], dict(secrets))


class FakeRegistry:
    """In place of fusecsi.engines: every engine name opens a Namespace on the FakeTree of
    its (engine, address). "embedded" keeps the real embedded parse_cluster (master-addrs,
    token), so both id formats (2 for embedded, 3 for the others) are exercised."""

    def __init__(self, **tree_options) -> None:
        self.tree_options = tree_options
        self.trees: dict[tuple[str, str], FakeTree] = {}

    def tree(self, engine: str, address: str) -> FakeTree:
        key = (engine, address)
        if key not in self.trees:
            self.trees[key] = FakeTree(**self.tree_options)
        return self.trees[key]

    def node_engine(self, name: str):
        if name == "embedded":
            return EMBEDDED_NODE
        if name == "curvine":  # stands for an engine this build lacks
            raise ImportError("No module named 'fusecsi.engines.curvine'")
        return _FakeNode(name)

    def open_namespace(self, cluster: Cluster, *, timeout: float) -> FakeNamespace:
        return FakeNamespace(self.tree(cluster.engine, cluster.address), cluster)
