"""The controller's view of a Curvine cluster, through the master's metadata RPCs.

Tags are Curvine xattrs (the master keeps them with the inode; curvine-fuse shows them as
ordinary xattrs). A new volume directory is created together with its tags and recorded
size in one Mkdir, which carries xattrs: no moment exists where it is there untagged.
Curvine has no directory quota: the size is recorded as the xattr `QUOTA_XATTR` and not
enforced (`quota_enforced = False`). Every call is bounded by the namespace's timeout.
"""

from __future__ import annotations

import errno
import posixpath
from collections.abc import Mapping

from fusecsi.engines.base import Cluster, Node
from fusecsi.engines.curvine.client import RENAME_NOREPLACE, MasterClient

# trusted.*: readable through the mount by mountd (root), not settable by an application
QUOTA_XATTR = "trusted.fusecsi.quota"
# The master expands these in ListStatus paths (glob); fusecsi never names such a path.
_GLOB = frozenset("*?[{\\")


def check_path(path: str) -> str:
    """`path` as the master expects it: absolute, normalized, no glob characters."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise OSError(errno.EINVAL, f"not an absolute path: {path!r}")
    parts = path.split("/")[1:]
    if path != "/" and any(part in ("", ".", "..") for part in parts):
        raise OSError(errno.EINVAL, f"not a normalized path: {path!r}")
    if _GLOB & set(path) or "\0" in path:
        raise OSError(errno.EINVAL, f"path {path!r} has a character Curvine treats as a glob")
    return path


def xattr_name(name: bytes) -> str:
    try:
        return name.decode()
    except UnicodeDecodeError:
        raise OSError(errno.EINVAL, f"xattr name {name!r} is not UTF-8") from None


def parse_quota(raw: bytes | None) -> int | None:
    if raw is None:
        return None
    text = raw.decode(errors="replace")
    if not text.isascii() or not text.isdigit():
        raise OSError(errno.EBADMSG, f"unreadable recorded size {text!r}")
    return int(text)


class CurvineNamespace:
    quota_enforced = False

    def __init__(self, cluster: Cluster, *, timeout: float) -> None:
        self.cluster = cluster
        self.client = MasterClient(cluster.address, timeout=timeout)

    async def __aenter__(self) -> CurvineNamespace:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.client.aclose()

    async def lookup(self, path: str) -> Node | None:
        try:
            status = await self.client.file_status(check_path(path))
        except FileNotFoundError:
            return None
        return Node(path, status.is_dir)

    async def listdir(self, path: str) -> list[Node]:
        status = await self.client.file_status(check_path(path))
        if not status.is_dir:
            raise OSError(errno.ENOTDIR, f"{path}: not a directory")
        entries = await self.client.list_status(path)
        return [Node(posixpath.join(path, entry.name), entry.is_dir) for entry in entries]

    async def mkdirs(self, path: str) -> None:
        # create_parent: an existing directory answers OK, an existing file EEXIST
        await self.client.mkdir(check_path(path), create_parent=True, mode=0o755)

    async def mkdir_tagged(
        self, path: str, mode: int, tags: Mapping[bytes, bytes], quota_bytes: int | None
    ) -> None:
        x_attr = {xattr_name(name): bytes(value) for name, value in tags.items()}
        if quota_bytes is not None:
            x_attr[QUOTA_XATTR] = str(quota_bytes).encode()
        # without create_parent, a taken name is FileAlreadyExists (EEXIST)
        try:
            await self.client.mkdir(check_path(path), create_parent=False, mode=mode, x_attr=x_attr)
        except OSError as exc:
            # a missing parent is only a Common error (EIO) on the wire; the seam says ENOENT
            parent = posixpath.dirname(path)
            if exc.errno == errno.EIO and await self.lookup(parent) is None:
                raise OSError(errno.ENOENT, f"{parent}: no such directory") from None
            raise

    async def _xattrs(self, path: str) -> Mapping[str, bytes]:
        return (await self.client.file_status(check_path(path))).x_attr

    async def get_tag(self, path: str, name: bytes) -> bytes | None:
        value = (await self._xattrs(path)).get(xattr_name(name))
        return None if value is None else bytes(value)

    async def set_tag(self, path: str, name: bytes, value: bytes) -> None:
        await self.client.set_xattrs(check_path(path), add={xattr_name(name): bytes(value)})

    async def remove_tag(self, path: str, name: bytes) -> None:
        await self.client.set_xattrs(check_path(path), remove=[xattr_name(name)])

    async def get_quota(self, path: str) -> int | None:
        return parse_quota((await self._xattrs(path)).get(QUOTA_XATTR))

    async def set_quota(self, path: str, max_bytes: int) -> None:
        await self.client.set_xattrs(check_path(path), add={QUOTA_XATTR: str(max_bytes).encode()})

    async def rename(self, src: str, dst: str) -> None:
        await self.client.rename(check_path(src), check_path(dst), flags=RENAME_NOREPLACE)

    async def rmdir(self, path: str) -> None:
        # Delete removes files too: make it rmdir's ENOTDIR, and ENOTEMPTY stays the master's
        status = await self.client.file_status(check_path(path))
        if not status.is_dir:
            raise OSError(errno.ENOTDIR, f"{path}: not a directory")
        await self.client.delete(path, recursive=False)

    async def remove_tree(self, path: str) -> None:
        if check_path(path) == "/":
            raise OSError(errno.EPERM, "refusing to remove the root of the cluster")
        await self.client.delete(path, recursive=True)

    async def sync(self) -> None:
        """Nothing to do: the master has journaled every change before answering."""

    async def capacity(self, path: str) -> int:
        """Free bytes of the whole cluster (no directory quota bounds a subtree)."""
        check_path(path)
        info = await self.client.filesystem_info()
        # live workers only, when the master reports it (older masters do not)
        if info.HasField("allocatable_available") and info.allocatable_capacity > 0:
            return max(0, info.allocatable_available)
        return max(0, info.available)
