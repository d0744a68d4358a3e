"""The controller's half of JuiceFS: directories and tags through a private mount (see
privmount.py), quotas through `juicefs quota` against the metadata engine."""

from __future__ import annotations

import ctypes
import errno
import os
import posixpath
import shutil
from collections.abc import Callable, Mapping
from typing import TypeVar

import trio

from fusecsi.engines.base import Cluster, Node, Unreachable
from fusecsi.engines.juicefs import metaurl, privmount, quota
from fusecsi.engines.juicefs.probe import probe

T = TypeVar("T")

# `juicefs quota get` prints limits rounded ("1.5 GiB"): the exact byte limit fusecsi set is
# kept beside it on the directory, and believed only while JuiceFS shows the same rounding
QUOTA_RECORD = "trusted.fusecsi.juicefs.quota"

_RENAME_NOREPLACE = 1
_AT_FDCWD = -100
_libc = ctypes.CDLL(None, use_errno=True)


def _rename_noreplace(src: str, dst: str) -> None:
    if _libc.renameat2(_AT_FDCWD, src.encode(), _AT_FDCWD, dst.encode(), _RENAME_NOREPLACE):
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), dst)


class JuiceFSNamespace:
    quota_enforced = True

    def __init__(self, cluster: Cluster, *, timeout: float) -> None:
        self.meta = metaurl.meta_of(cluster)
        self.timeout = timeout
        self._mount: privmount.PrivateMount | None = None

    async def __aenter__(self) -> JuiceFSNamespace:
        # a quick answer first: a dead metadata engine would make the mount hang in retries
        with trio.move_on_after(self.timeout) as scope:
            failure = await probe(self.meta, seconds=self.timeout)
        if scope.cancelled_caught:
            failure = Unreachable(f"JuiceFS metadata {self.meta.public} did not answer")
        if failure is not None:
            raise failure
        self._mount = await privmount.acquire(self.meta, seconds=self.timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._mount is not None:
            privmount.release(self._mount)
            self._mount = None

    # -- paths -------------------------------------------------------------------------

    def _local(self, path: str) -> str:
        """`path` of the cluster inside the private mount; never outside it."""
        if self._mount is None:
            raise RuntimeError("JuiceFS namespace used outside its `async with`")
        clean = posixpath.normpath("/" + path.lstrip("/"))
        if not path.startswith("/") or ".." in path.split("/"):
            raise OSError(errno.EINVAL, f"not an absolute clean path: {path!r}")
        return self._mount.root + ("" if clean == "/" else clean)

    async def _fs(self, fn: Callable[..., T], *args: object) -> T:
        """A filesystem call on the mount in a thread, bounded: a FUSE call waits for a
        metadata engine that stopped answering, and that thread is then left behind."""
        try:
            with trio.fail_after(self.timeout):
                return await trio.to_thread.run_sync(lambda: fn(*args), abandon_on_cancel=True)
        except trio.TooSlowError:
            raise Unreachable(
                f"JuiceFS {self.meta.public} did not answer within {self.timeout:g}s"
            ) from None
        except OSError as exc:
            if exc.errno == errno.ENOTCONN:  # the mount process died: start again next time
                raise Unreachable(
                    f"JuiceFS {self.meta.public}: the controller's mount died"
                ) from exc
            raise

    # -- Namespace ---------------------------------------------------------------------

    async def lookup(self, path: str) -> Node | None:
        local = self._local(path)

        def stat() -> Node | None:
            try:
                st = os.lstat(local)
            except FileNotFoundError:
                return None
            return Node(path, (st.st_mode & 0o170000) == 0o040000)

        return await self._fs(stat)

    async def listdir(self, path: str) -> list[Node]:
        local = self._local(path)

        def scan() -> list[Node]:
            with os.scandir(local) as entries:
                return [
                    Node(posixpath.join(path, e.name), e.is_dir(follow_symlinks=False))
                    for e in entries
                ]

        return await self._fs(scan)

    async def mkdirs(self, path: str) -> None:
        local = self._local(path)
        await self._fs(lambda: os.makedirs(local, 0o755, exist_ok=True))

    async def mkdir_tagged(
        self, path: str, mode: int, tags: Mapping[bytes, bytes], quota_bytes: int | None
    ) -> None:
        local = self._local(path)

        def make() -> None:
            os.mkdir(local, mode)
            os.chmod(local, mode)  # mkdir's mode went through our umask
            for name, value in tags.items():
                os.setxattr(local, name, value)

        await self._fs(make)
        if quota_bytes is not None:
            await self.set_quota(path, quota_bytes)

    async def get_tag(self, path: str, name: bytes) -> bytes | None:
        local = self._local(path)

        def get() -> bytes | None:
            try:
                return os.getxattr(local, name)
            except OSError as exc:
                if exc.errno == errno.ENODATA:
                    return None
                raise

        return await self._fs(get)

    async def set_tag(self, path: str, name: bytes, value: bytes) -> None:
        local = self._local(path)
        await self._fs(os.setxattr, local, name, value)

    async def remove_tag(self, path: str, name: bytes) -> None:
        local = self._local(path)

        def remove() -> None:
            try:
                os.removexattr(local, name)
            except OSError as exc:
                if exc.errno != errno.ENODATA:  # already gone is what was asked
                    raise

        await self._fs(remove)

    async def get_quota(self, path: str) -> int | None:
        self._local(path)
        shown = await quota.get_limit(self.meta, path, seconds=self.timeout)
        if shown is None:
            return None
        record = await self.get_tag(path, QUOTA_RECORD.encode())
        if record is not None and record.isdigit() and quota.displayed(int(record)) == shown:
            return int(record)
        return quota.parse_displayed(shown)  # changed outside fusecsi: as JuiceFS shows it

    async def set_quota(self, path: str, max_bytes: int) -> None:
        self._local(path)
        await quota.set_limit(self.meta, path, max_bytes, seconds=self.timeout)
        await self.set_tag(path, QUOTA_RECORD.encode(), str(max_bytes).encode())

    async def rename(self, src: str, dst: str) -> None:
        await self._fs(_rename_noreplace, self._local(src), self._local(dst))

    async def rmdir(self, path: str) -> None:
        await self._fs(os.rmdir, self._local(path))

    async def remove_tree(self, path: str) -> None:
        local = self._local(path)

        def remove() -> None:
            if os.path.isdir(local) and not os.path.islink(local):
                shutil.rmtree(local)  # never follows symlinks
            else:
                os.unlink(local)

        await self._fs(remove)

    async def sync(self) -> None:
        # each call above returned after the metadata engine acknowledged it; how durable
        # that is is the engine's setting (Redis: appendonly / appendfsync)
        return None

    async def capacity(self, path: str) -> int:
        st = await self._fs(os.statvfs, self._local(path))
        return st.f_bavail * st.f_frsize
