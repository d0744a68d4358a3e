"""The controller's view of the embedded cluster (engines.base.Namespace) on a ClusterClient.

Paths are resolved by the master in the call that uses them where it can (`mkvolume` takes
the parent's path), else just before: the controller keeps no inode numbers between calls,
so none can be stale. A volume is born tagged and sized in one `mkvolume`, which the master
makes durable before it answers; every other change is acknowledged before it reaches the
master's disk, so `sync` (the master's `sync_journal`) follows them before a CSI answer.
"""

from __future__ import annotations

import errno
import stat
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from fusecsi.cluster.client import (
    RENAME_NOREPLACE,
    ROOT_INO,
    Attr,
    ClusterClient,
    ClusterUnavailable,
)
from fusecsi.engines.base import Cluster, Namespace, Node, Unreachable

FIRST_COOKIE = 0  # readdir from the first entry


@contextmanager
def _unreachable_as_seam_error() -> Iterator[None]:
    """No master answered: the seam's Unreachable, with the client's one-line reason."""
    try:
        yield
    except ClusterUnavailable as exc:
        raise Unreachable(exc.strerror or str(exc), exc.errno or errno.ETIMEDOUT) from None


def _split(path: str) -> tuple[str, bytes]:
    """(parent path, own name) of an absolute path below the root."""
    parent, _, name = path.rpartition("/")
    if not name:
        raise OSError(errno.EINVAL, f"{path!r} names no entry below the root")
    return parent or "/", name.encode(errors="surrogateescape")


class EmbeddedNamespace:
    """One open ClusterClient for one (cluster, token); enter it before use."""

    quota_enforced = True

    def __init__(self, cluster: Cluster, *, timeout: float) -> None:
        self.cluster = cluster
        self._client = ClusterClient(
            cluster.address.split(","), token=cluster.secrets.get("token") or None, timeout=timeout
        )

    async def __aenter__(self) -> Namespace:
        await self._client.__aenter__()
        return self

    async def __aexit__(self, *exc) -> None:
        await self._client.__aexit__(*exc)

    async def _attr(self, path: str) -> Attr:
        """What is at `path`: the master resolves it in one call; a path with a name that is
        not UTF-8 (one listdir found inside a volume, decoded with surrogateescape) is
        walked name by name, as the master's paths are text."""
        try:
            path.encode()
        except UnicodeEncodeError:
            attr = await self._client.getattr(ROOT_INO)
            for part in path.strip("/").split("/"):
                attr = await self._client.lookup(attr.ino, part.encode(errors="surrogateescape"))
            return attr
        return await self._client.resolve(path)

    async def _ino(self, path: str) -> int:
        return (await self._attr(path)).ino

    async def lookup(self, path: str) -> Node | None:
        with _unreachable_as_seam_error():
            try:
                attr = await self._attr(path)
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                    return None
                raise
        return Node(path, stat.S_ISDIR(attr.mode))

    async def listdir(self, path: str) -> list[Node]:
        with _unreachable_as_seam_error():
            ino = await self._ino(path)
            found: list[Node] = []
            cookie = FIRST_COOKIE
            while batch := await self._client.readdir(ino, cookie):
                cookie = batch[-1][2]
                for name, attr, _ in batch:
                    child = f"{path.rstrip('/')}/{name.decode(errors='surrogateescape')}"
                    found.append(Node(child, stat.S_ISDIR(attr.mode)))
        return found

    async def mkdirs(self, path: str) -> None:
        with _unreachable_as_seam_error():
            await self._client.mkdirs(path)

    async def mkdir_tagged(
        self, path: str, mode: int, tags: Mapping[bytes, bytes], quota_bytes: int | None
    ) -> None:
        # one durable journal record: nobody ever sees the directory untagged or unlimited
        parent, name = _split(path)
        with _unreachable_as_seam_error():
            await self._client.mkvolume(parent, name, mode, dict(tags), quota_bytes)

    async def get_tag(self, path: str, name: bytes) -> bytes | None:
        with _unreachable_as_seam_error():
            ino = await self._ino(path)
            try:
                return await self._client.getxattr(ino, name)
            except OSError as exc:
                if exc.errno == errno.ENODATA:
                    return None
                raise

    async def set_tag(self, path: str, name: bytes, value: bytes) -> None:
        with _unreachable_as_seam_error():
            ino = await self._ino(path)
            await self._client.setxattr(ino, name, value)

    async def remove_tag(self, path: str, name: bytes) -> None:
        with _unreachable_as_seam_error():
            ino = await self._ino(path)
            await self._client.removexattr(ino, name)

    async def get_quota(self, path: str) -> int | None:
        with _unreachable_as_seam_error():
            ino = await self._ino(path)
            try:
                quota = await self._client.get_quota(ino)
            except OSError as exc:
                if exc.errno == errno.ENODATA:
                    return None
                raise
        # the master answers the nearest quota above: only the directory's own counts
        return quota.max_bytes if quota.ino == ino else None

    async def set_quota(self, path: str, max_bytes: int) -> None:
        with _unreachable_as_seam_error():
            ino = await self._ino(path)
            await self._client.set_quota(ino, max_bytes, None)

    async def rename(self, src: str, dst: str) -> None:
        (src_parent, src_name), (dst_parent, dst_name) = _split(src), _split(dst)
        with _unreachable_as_seam_error():
            src_ino = await self._ino(src_parent)
            dst_ino = src_ino
            if dst_parent != src_parent:
                dst_ino = await self._ino(dst_parent)
            await self._client.rename(src_ino, src_name, dst_ino, dst_name, RENAME_NOREPLACE)

    async def rmdir(self, path: str) -> None:
        parent, name = _split(path)
        with _unreachable_as_seam_error():
            await self._client.rmdir(await self._ino(parent), name)

    async def remove_tree(self, path: str) -> None:
        with _unreachable_as_seam_error():
            await self._client.remove_tree(path)

    async def sync(self) -> None:
        with _unreachable_as_seam_error():
            await self._client.sync_journal()

    async def capacity(self, path: str) -> int:
        """The cluster's free bytes, capped by what the nearest quota at or above `path`
        leaves (a missing `path` caps nothing)."""
        with _unreachable_as_seam_error():
            free = (await self._client.statfs())["free_bytes"]
            try:
                base = await self._client.resolve(path)
                quota = await self._client.get_quota(base.ino)
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ENODATA):
                    raise
                return free
        if quota.max_bytes is None:
            return free
        return min(free, max(0, quota.max_bytes - quota.used_bytes))
