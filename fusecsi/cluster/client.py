"""The cluster client used by the FUSE daemon, the controller and `fusecsi fs`.

Metadata calls go to the masters (failing over between the listed addresses); data goes
straight to the workers. Writes land on the workers at once but a file's new length becomes
visible to others only when `commit()` publishes it. Every call has a deadline; calls that
are safe to repeat are retried across reconnects until it passes.

Kept cheap to import: trio and msgpack only.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import trio

from fusecsi.cluster.shortcircuit import INLINE_MAX, ShortCircuit
from fusecsi.cluster.writebehind import TRANSIENT, WriteBehind, WriteLost
from fusecsi.errors import run_all
from fusecsi.rpc.errors import ForeignCluster, RPCError, RPCUnavailable
from fusecsi.rpc.pool import Pool

log = logging.getLogger(__name__)

__all__ = [
    "ROOT_INO",
    "RENAME_NOREPLACE",
    "RENAME_EXCHANGE",
    "Attr",
    "Quota",
    "ClusterError",
    "ClusterUnavailable",
    "ClusterClient",
    "WriteLost",
]

ROOT_INO = 1
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
MASTER_PORT = 8995
WORKER_PORT = 8997
ALLOCATE_AHEAD = 8
MAX_CACHED_FILES = 4096
MAX_UNSYNCED = 65536
WRITE_WINDOW = 8  # block-sized pieces in flight per client
FIRST_BACKOFF = 0.05  # seconds before a piece is sent again to a worker that did not answer
MAX_BACKOFF = 1.0
MAX_ALLOCATE = 64
READ_MAP_TTL = 1.0  # seconds a cached block map serves reads (see `forget_layout`)
READ_MAP_WINDOW = 64  # blocks asked for at once when reading
MAX_READ_MAP_BLOCKS = 16384
SHORT_CIRCUIT_ENV = "FUSECSI_SHORT_CIRCUIT"  # "0" turns short-circuit I/O off

ClusterError = RPCError
ClusterUnavailable = RPCUnavailable
# how long a client that never reached a master keeps trying (fs, a new mount, the controller)
FIRST_CONTACT = 2.0
FIRST_ANSWER = 5.0


@dataclass(frozen=True, slots=True)
class Attr:
    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    rdev: int = 0  # devices only (the master sends it for them alone)


@dataclass(frozen=True, slots=True)
class Quota:
    ino: int
    max_bytes: int | None
    max_inodes: int | None
    used_bytes: int
    used_inodes: int


class _ReadMap:
    """A file's block map as the master last gave it, for reads: index -> (block id,
    addresses, holds data), or None for a hole; `committed` is the length the master
    reported."""

    __slots__ = ("expires", "committed", "blocks")

    def __init__(self, expires: float, committed: int) -> None:
        self.expires = expires
        self.committed = committed
        self.blocks: dict[int, tuple[int, list[str]] | None] = {}


class _Stale(Exception):
    """A cached block map named a block the workers no longer have."""


def one_master_call(method):
    """Marks a method that is one master call under the client's own deadline (`timeout`):
    a caller's retry policy may let its first attempt run without a deadline of its own
    (fusecsi/fuse/calls.py)."""
    method.one_master_call = True
    return method


def _addrs(master_addrs: str | Sequence[str]) -> list[str]:
    items = master_addrs.split(",") if isinstance(master_addrs, str) else list(master_addrs)
    out = [a.strip() for a in items if a.strip()]
    if not out:
        raise ValueError("no master address given")
    return out


class ClusterClient:
    def __init__(
        self,
        master_addrs: str | Sequence[str],
        *,
        token: str | None = None,
        timeout: float = 30.0,
        short_circuit: bool | None = None,
    ) -> None:
        self.master_addrs = _addrs(master_addrs)
        if short_circuit is None:
            short_circuit = os.environ.get(SHORT_CIRCUIT_ENV, "1") != "0"
        self.short_circuit = short_circuit
        self._sc: ShortCircuit | None = None
        # ino -> block map for reads (kept up to date by this client's own writes)
        self._read_maps: dict[int, _ReadMap] = {}
        self.token = token
        self.timeout = timeout
        self._current = 0
        self._stack: contextlib.AsyncExitStack | None = None
        self._behind: WriteBehind | None = None
        self._nursery: trio.Nursery | None = None
        self._masters: Pool | None = None
        self._workers: Pool | None = None
        self._block_size: int | None = None
        self._cluster_id: str | None = None  # of the first master that answered
        # ino -> {block index: (block id, [worker addresses])}, for writes
        self._layouts: dict[int, dict[int, tuple[int, list[str]]]] = {}
        # ino -> highest end written and not yet committed
        self._pending: dict[int, int] = {}
        # ino -> {(block id, worker addresses)} written since the last durable commit
        self._unsynced: dict[int, set[tuple[int, tuple[str, ...]]]] = {}
        # ino -> length the master said the file may grow to (quota) without asking again
        self._granted: dict[int, int] = {}

    async def __aenter__(self) -> ClusterClient:
        stack = contextlib.AsyncExitStack()
        stack.callback(self._close_short_circuit)  # after the nursery: nobody uses them then
        nursery = await stack.enter_async_context(trio.open_nursery())
        self._masters = Pool(
            nursery,
            token=self.token,
            default_port=MASTER_PORT,
            max_conns=2,
            timeout=self.timeout,
            on_connect=self._check_master,
        )
        self._workers = Pool(
            nursery, token=self.token, default_port=WORKER_PORT, max_conns=4, timeout=self.timeout
        )
        self._behind = WriteBehind(nursery, WRITE_WINDOW)
        if self.short_circuit:
            self._sc = ShortCircuit(self._workers, self.token)
            nursery.start_soon(self._sc.sweep)
        self._nursery = nursery
        self._stack = stack
        return self

    async def __aexit__(self, *exc_info) -> bool | None:
        """Close every connection; writes never committed are dropped (they were invisible)."""
        stack, self._stack = self._stack, None
        self._nursery.cancel_scope.cancel()
        self._masters.close()
        self._workers.close()
        return await stack.__aexit__(*exc_info)

    def _close_short_circuit(self) -> None:
        sc, self._sc = self._sc, None
        if sc is not None:
            sc.close()

    # ------------------------------------------------------------ plumbing

    async def _check_master(self, conn) -> None:
        """Every new master connection: the master must hold the cluster the first one held
        (masters do not replicate; another id is another namespace)."""
        info = await conn.call("cluster_info")
        found = info.get("cluster_id")
        if self._cluster_id is None:
            self._cluster_id = found
        elif found != self._cluster_id:
            raise ForeignCluster(
                errno.ESTALE,
                f"master {conn.address} belongs to cluster {found}, not {self._cluster_id}",
            )

    async def _call(self, method: str, *args: Any, idempotent: bool = False) -> Any:
        """A master call: fail over between masters, retry while allowed, within the timeout.
        A master of another cluster (ESTALE) is skipped like one that is down; EAGAIN ("not
        ready", nothing was done) is asked again after a pause."""
        pool = self._masters
        if pool is None:
            raise RuntimeError("use the client inside `async with`")
        deadline = trio.current_time() + self.timeout
        first_contact = trio.current_time() + FIRST_CONTACT
        delay = 0.05
        n = len(self.master_addrs)
        last: RPCError | None = None
        refused: RPCError | None = None
        while True:
            for k in range(n):  # the current master first
                i = (self._current + k) % n
                remaining = deadline - trio.current_time()
                if remaining <= 0:
                    break
                try:
                    result = await pool.call(
                        self.master_addrs[i],
                        method,
                        *args,
                        idempotent=idempotent,
                        # a never-reached address gets a short first answer (a silent peer
                        # is no fusecsi master); once reached, the whole timeout
                        time_limit=remaining if self._cluster_id else min(remaining, FIRST_ANSWER),
                    )
                except RPCUnavailable as exc:
                    if exc.sent and not idempotent:
                        raise ClusterUnavailable(
                            errno.ETIMEDOUT, f"{method}: {exc.strerror}"
                        ) from None
                    last = exc
                    continue
                except ForeignCluster as exc:
                    refused = exc
                    continue
                except RPCError as exc:
                    if exc.errno != errno.EAGAIN:
                        raise
                    self._current, last = i, exc
                    break  # the master that answered is the one to ask again
                self._current = i
                return result
            if last is None or trio.current_time() + delay >= deadline:
                raise self._gave_up(method, last, refused)
            if self._cluster_id is None and (
                last.errno == errno.EPROTO or trio.current_time() >= first_contact
            ):
                # no master ever answered: a wrong address (refused, no such host, another
                # protocol) fails now, not after the timeout; once reached, a refusal is a
                # master restarting and is waited for
                raise self._gave_up(method, last, refused)
            await trio.sleep(delay)
            delay = min(delay * 2, 1.0)

    @staticmethod
    def _gave_up(method: str, last: RPCError | None, refused: RPCError | None) -> RPCError:
        if last is None:  # every master was refused (or no time was left at all)
            if refused is not None:
                return ClusterError(errno.ESTALE, f"{method}: {refused.strerror}")
            return ClusterUnavailable(errno.ETIMEDOUT, f"{method}: no time left")
        why = last.strerror + (f"; {refused.strerror}" if refused is not None else "")
        if last.errno == errno.EAGAIN:
            return ClusterUnavailable(errno.ETIMEDOUT, f"{method}: master not ready: {why}")
        code = errno.ETIMEDOUT if last.errno == errno.ETIMEDOUT else errno.ECONNREFUSED
        return ClusterUnavailable(code, f"no master answered {method}: {why}")

    async def _attr(self, method: str, *args: Any, idempotent: bool = False) -> Attr:
        return Attr(*await self._call(method, *args, idempotent=idempotent))

    async def block_size(self) -> int:
        if self._block_size is None:
            info = await self._call("cluster_info", idempotent=True)
            self._block_size = info["block_size"]
        return self._block_size

    async def cluster_info(self) -> dict:
        return await self._call("cluster_info", idempotent=True)

    # ------------------------------------------------------------ namespace

    @one_master_call
    async def lookup(self, parent: int, name: bytes) -> Attr:
        return await self._attr("lookup", parent, name, idempotent=True)

    @one_master_call
    async def getattr(self, ino: int) -> Attr:
        return await self._attr("getattr", ino, idempotent=True)

    async def setattr(
        self,
        ino: int,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
    ) -> Attr:
        if size is not None:
            # a size change discards uncommitted data past the committed length: publish ours
            # (no further than a kept loss: the loss itself stays, see `write`)
            await self._behind.drain(ino)
            pending = self._pending.get(ino)
            if pending is not None:
                with contextlib.suppress(WriteLost):
                    await self.commit(ino, pending)
            self._forget_blocks(ino)
        attr = await self._attr(
            "setattr", ino, mode, uid, gid, size, atime_ns, mtime_ns, idempotent=True
        )
        if size is not None:
            self._pending.pop(ino, None)
        return attr

    @one_master_call
    async def mkdir(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> Attr:
        return await self._attr("mkdir", parent, name, mode, uid, gid)

    @one_master_call
    async def create(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> Attr:
        return await self._attr("create", parent, name, mode, uid, gid)

    async def mknod(
        self, parent: int, name: bytes, mode: int, rdev: int, uid: int, gid: int
    ) -> Attr:
        """A FIFO, socket or device (type bits in `mode`): an inode without data."""
        return await self._attr("mknod", parent, name, mode, rdev, uid, gid)

    async def create_batch(
        self, parent: int, names: list[bytes], mode: int = 0o644, uid: int = 0, gid: int = 0
    ) -> int:
        """Create many empty files at once (bulk loads); not part of the FUSE path."""
        return await self._call("create_batch", parent, names, mode, uid, gid)

    @one_master_call
    async def unlink(self, parent: int, name: bytes) -> None:
        await self._call("unlink", parent, name)

    @one_master_call
    async def rmdir(self, parent: int, name: bytes) -> None:
        await self._call("rmdir", parent, name)

    @one_master_call
    async def rename(
        self, parent: int, name: bytes, new_parent: int, new_name: bytes, flags: int = 0
    ) -> None:
        await self._call("rename", parent, name, new_parent, new_name, flags)

    @one_master_call
    async def readdir(
        self, ino: int, cookie: int = 0, limit: int = 1000
    ) -> list[tuple[bytes, Attr, int]]:
        rows = await self._call("readdir", ino, cookie, limit, idempotent=True)
        return [(name, Attr(*attr), next_cookie) for name, attr, next_cookie in rows]

    @one_master_call
    async def symlink(self, parent: int, name: bytes, target: bytes, uid: int, gid: int) -> Attr:
        return await self._attr("symlink", parent, name, target, uid, gid)

    @one_master_call
    async def readlink(self, ino: int) -> bytes:
        return await self._call("readlink", ino, idempotent=True)

    @one_master_call
    async def link(self, ino: int, new_parent: int, new_name: bytes) -> Attr:
        return await self._attr("link", ino, new_parent, new_name)

    async def getxattr(self, ino: int, name: bytes) -> bytes:
        return await self._call("getxattr", ino, name, idempotent=True)

    async def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0) -> None:
        await self._call("setxattr", ino, name, value, flags, idempotent=flags == 0)

    async def listxattr(self, ino: int) -> list[bytes]:
        return await self._call("listxattr", ino, idempotent=True)

    async def removexattr(self, ino: int, name: bytes) -> None:
        await self._call("removexattr", ino, name)

    async def statfs(self, ino: int | None = None) -> dict:
        """The cluster's totals, or with `ino` those of the nearest quota above it."""
        args = () if ino is None else (ino,)
        return await self._call("statfs", *args, idempotent=True)

    # ------------------------------------------------------------ quotas and paths

    async def set_quota(self, ino: int, max_bytes: int | None, max_inodes: int | None) -> Quota:
        return Quota(*await self._call("set_quota", ino, max_bytes, max_inodes, idempotent=True))

    async def get_quota(self, ino: int) -> Quota:
        """The quota of `ino` or of its nearest ancestor that has one (ENODATA: none)."""
        return Quota(*await self._call("get_quota", ino, idempotent=True))

    async def resolve(self, path: str) -> Attr:
        return await self._attr("resolve", path, idempotent=True)

    async def mkdirs(self, path: str, mode: int = 0o755) -> Attr:
        return await self._attr("mkdirs", path, mode, 0, 0, idempotent=True)

    async def mkvolume(
        self,
        parent: int | str,
        name: bytes,
        mode: int,
        xattrs: dict[bytes, bytes],
        max_bytes: int,
    ) -> Attr:
        """A directory born with its xattrs and byte quota in one durable journal record
        (EEXIST when the name is taken): nobody ever sees it untagged or unlimited. `parent`:
        an inode, or an absolute path the master resolves in the same step."""
        return await self._attr("mkvolume", parent, name, mode, xattrs, max_bytes)

    async def sync_journal(self) -> None:
        """Return once every namespace change acknowledged so far is on the master's disk."""
        await self._call("sync_journal", idempotent=True)

    async def remove_tree(self, path: str) -> None:
        """Remove `path` and everything below it; nothing to do when it does not exist."""
        await self._call("remove_tree", path, idempotent=True)

    # ------------------------------------------------------------ data

    async def write(self, ino: int, offset: int, data: bytes) -> None:
        """Send `data` to the workers; returns once it is on its way (see writebehind.py).

        A refusal before anything was sent (EDQUOT, ENOSPC from the allocation, or no master
        answering) raises and changes nothing. Any later failure (a piece whose worker
        stayed away for the client's timeout, or refused it) means data may be missing: the
        file keeps a `WriteLost` (errno EIO, or the worker's refusal) that every later write,
        read and commit raises, and no commit publishes a length past its offset, until
        `forget_writes`. `data` must not change after the call (bytes are kept as they are;
        other buffers are copied)."""
        if offset < 0:
            raise ClusterError(errno.EINVAL, "negative offset")
        if not data:
            return
        self._behind.check(ino)
        if not isinstance(data, bytes):
            data = bytes(data)
        bs = self._block_size or await self.block_size()
        end = offset + len(data)
        first, last = offset // bs, (end - 1) // bs
        await self._write_layout(ino, first, last, end)
        view = memoryview(data)
        try:
            for index in range(first, last + 1):
                lo = max(offset, index * bs)
                hi = min(end, (index + 1) * bs)
                piece = view[lo - offset : hi - offset]
                await self._behind.submit(
                    ino, lo, hi, partial(self._put, ino, index, lo - index * bs, piece, end)
                )
        except BaseException as exc:  # some pieces may be on their way, the others are not
            self.write_lost(ino, offset, exc)
            raise
        if end > self._pending.get(ino, 0):
            self._pending[ino] = end

    def write_lost(self, ino: int, offset: int, exc: BaseException) -> None:
        """Data from `offset` on that the caller had taken for `ino` (and acknowledged) was not
        stored: keep the loss (see `write`)."""
        why = exc if isinstance(exc, OSError) else RPCError(errno.EIO, repr(exc))
        self._behind.lost(ino, offset, why)

    def reserved(self, ino: int, offset: int, length: int) -> bool:
        """True when a write of `length` bytes at `offset` needs no word from the master: its
        blocks are placed and it ends within the length the master allowed (no await)."""
        bs = self._block_size
        layout = self._layouts.get(ino)
        end = offset + length
        if bs is None or layout is None or end > self._granted.get(ino, 0):
            return False
        return all(i in layout for i in range(offset // bs, (end - 1) // bs + 1))

    async def reserve(self, ino: int, offset: int, length: int) -> int:
        """Check, before taking data, that a write of `length` bytes at `offset` may be stored:
        its blocks are placed (ENOSPC otherwise) and the quotas above the file leave room
        (EDQUOT). Returns how many of the bytes fit (fewer at a quota: a short write), so a
        refused write changes nothing. The room is not held for this file against others'."""
        if length <= 0 or self.reserved(ino, offset, length):
            return max(length, 0)
        bs = self._block_size or await self.block_size()
        end = offset + length
        try:
            await self._write_layout(ino, offset // bs, (end - 1) // bs, end)
            return length
        except ClusterError as exc:
            if exc.errno != errno.EDQUOT:
                raise
            refused = exc
        # at the quota: as much as still fits (the master's grant for a write ending at offset)
        try:
            await self._write_layout(ino, offset // bs, offset // bs, offset)
        except ClusterError:
            raise refused from None
        fits = min(self._granted.get(ino, 0), end) - offset
        if fits <= 0:
            raise refused
        await self._write_layout(ino, offset // bs, (offset + fits - 1) // bs, offset + fits)
        return fits

    def write_error(self, ino: int) -> ClusterError | None:
        """The loss kept for `ino` (see `write`), if any."""
        try:
            self._behind.check(ino)
        except WriteLost as exc:
            return exc
        return None

    def forget_writes(self, ino: int) -> None:
        """Nobody holds `ino` open for writing any more: drop its kept loss and the length
        written but never published (the master's length is the file's length again)."""
        self._behind.forget(ino)
        self._pending.pop(ino, None)

    async def _put(self, ino: int, index: int, offset: int, data, end: int) -> None:
        """Write one piece of one block to its replicas. A worker that does not answer is
        asked again (on a new connection, over TCP once its local socket is gone) until the
        client's timeout: a worker restarted within it loses no write."""
        deadline = trio.current_time() + self.timeout
        delay = FIRST_BACKOFF
        refreshed = False
        while True:
            layout = self._layouts.get(ino)
            if layout is None or index not in layout:
                layout = await self._write_layout(ino, index, index, end)
            block_id, addrs = layout[index]
            try:
                await self._write_block(block_id, addrs, offset, data, deadline)
            except ClusterError as exc:
                # ENOENT: the block was freed under a cached map (a truncate elsewhere)
                if exc.errno == errno.ENOENT and not refreshed:
                    refreshed = True
                    self._forget_blocks(ino)
                    continue
                if exc.errno not in TRANSIENT or trio.current_time() + delay >= deadline:
                    log.warning("write of block %d to %s failed: %s", block_id, addrs, exc)
                    raise
                if delay == FIRST_BACKOFF:
                    log.info("write of block %d to %s, retrying: %s", block_id, addrs, exc)
                await trio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF)
                continue
            self._unsynced.setdefault(ino, set()).add((block_id, tuple(addrs)))
            rmap = self._read_maps.get(ino)
            if rmap is not None and index in rmap.blocks:
                rmap.blocks[index] = (block_id, addrs)
            return

    def forget_layout(self, ino: int) -> None:
        """Drop the block map cached for reading `ino`. The FUSE daemon calls it when a file
        is opened (close-to-open: the next read asks the master); otherwise a map serves
        reads for READ_MAP_TTL seconds (see `read`). Maps kept for writing need no such
        care: a write to a freed block fails at the worker and asks again."""
        self._read_maps.pop(ino, None)

    def _forget_blocks(self, ino: int) -> None:
        """Drop everything cached about `ino`'s blocks and quota grant (after a truncate)."""
        self._layouts.pop(ino, None)
        self._granted.pop(ino, None)
        self._read_maps.pop(ino, None)

    async def _write_layout(self, ino: int, first: int, last: int, end: int) -> dict:
        """Block locations for a write; asks the master when a block is unknown or the write
        goes past the length it last allowed (so quotas are checked as the file grows)."""
        layout = self._layouts.get(ino)
        if layout is None:
            if len(self._layouts) >= MAX_CACHED_FILES:
                # forget the oldest file's map (it is only a cache)
                oldest = next(iter(self._layouts))
                del self._layouts[oldest]
                self._granted.pop(oldest, None)
            layout = self._layouts[ino] = {}
        missing = [i for i in range(first, last + 1) if i not in layout]
        if missing or end > self._granted.get(ino, 0):
            start = missing[0] if missing else first
            count = min(last - start + 1 + ALLOCATE_AHEAD, MAX_ALLOCATE)
            reply = await self._call("allocate", ino, start, count, end, idempotent=True)
            for index, block_id, addrs in reply["blocks"]:
                layout[index] = (block_id, addrs)
            self._granted[ino] = reply["grant"]
            if any(i not in layout for i in missing):
                raise ClusterError(errno.EIO, f"no placement for inode {ino}")
        return layout

    @staticmethod
    async def _each(fn, items: list) -> None:
        """Run `fn(item)` for every item concurrently; raise the most telling failure."""
        if len(items) == 1:
            await fn(items[0])
            return
        await run_all(
            [partial(fn, item) for item in items],
            catch=ClusterError,
            # a stale block map (ENOENT) only matters when nothing worse happened
            pick=lambda errors: min(errors, key=lambda e: e.errno == errno.ENOENT),
        )

    async def _write_block(
        self, block_id: int, addrs: list[str], offset: int, data, deadline: float
    ) -> None:
        """To every replica at once: the one on this host (if any) through its files, the
        others over TCP (each call ends by `deadline`)."""
        if not addrs:
            raise ClusterError(errno.EIO, f"block {block_id} has no live replica")
        pool, sc = self._workers, self._sc

        async def one(addr: str) -> None:
            worker = await sc.worker(addr) if sc is not None else None
            if worker is not None:
                try:
                    return await sc.write(worker, block_id, offset, data)
                except ClusterError as exc:
                    if exc.errno in (errno.ENOENT, errno.EDQUOT, errno.ENOSPC):
                        raise
                    # anything else: the worker's own path decides
            await pool.call(
                addr,
                "write_block",
                block_id,
                offset,
                data,
                idempotent=True,
                time_limit=max(0.0, deadline - trio.current_time()),
            )

        await self._each(one, addrs)

    async def _sync_blocks(self, ino: int) -> None:
        blocks = self._unsynced.pop(ino, set())
        by_worker: dict[str, list[int]] = {}
        for block_id, addrs in blocks:
            for addr in addrs:
                by_worker.setdefault(addr, []).append(block_id)
        pool = self._workers
        try:
            await self._each(
                lambda addr: pool.call(addr, "sync_blocks", by_worker[addr], idempotent=True),
                list(by_worker),
            )
        except BaseException:
            self._unsynced.setdefault(ino, set()).update(blocks)
            raise

    async def read(self, ino: int, offset: int, size: int) -> bytes | memoryview:
        """Bytes of the file at `offset`: short at the end, holes as zeros. A large piece
        read on this host comes as a memoryview (of memory nothing else uses).

        The block map comes from a cache refreshed after READ_MAP_TTL seconds, by
        `forget_layout`, when the read reaches past the length the master last reported, or
        when a block it names is gone from the workers (freed by a truncate elsewhere); the
        data itself is always read from the workers' current files."""
        if offset < 0 or size < 0:
            raise ClusterError(errno.EINVAL, "negative offset or size")
        if size == 0:
            return b""
        await self._behind.drain(ino)
        self._behind.check(ino)
        bs = self._block_size or await self.block_size()
        first = offset // bs
        last = (offset + size - 1) // bs
        rmap = self._cached_map(ino, first, last, offset + size)
        cached = rmap is not None
        while True:
            if rmap is None:
                rmap = await self._read_map(ino, first, last)
            try:
                return await self._read_mapped(ino, rmap, offset, size, bs, cached)
            except _Stale:
                self._read_maps.pop(ino, None)
                rmap, cached = None, False

    def read_now(self, ino: int, offset: int, size: int) -> bytes | None:
        """`read` of a small piece inside one block, answered at once when nothing has to
        wait: a block map and the block's descriptors already held (a worker on this host),
        no write of the file on its way. None otherwise, or on any failure: then `read`.
        Small random reads (O_DIRECT ones all reach the daemon) skip the deadline, the
        locks and the awaits of the full path, which cost more than the read itself."""
        sc, bs = self._sc, self._block_size
        if sc is None or not bs or not 0 < size <= INLINE_MAX or ino in self._behind.files:
            return None
        index = offset // bs
        if (offset + size - 1) // bs != index:
            return None
        rmap = self._cached_map(ino, index, index, offset + size)
        block = None if rmap is None else rmap.blocks.get(index)
        if block is None:  # no map, or a hole: the full path
            return None
        for addr in block[1]:
            worker = sc.local.get(addr)
            if worker is not None and worker.alive:
                return sc.read_now(worker, block[0], offset - index * bs, size)
        return None

    def _cached_map(self, ino: int, first: int, last: int, end: int) -> _ReadMap | None:
        rmap = self._read_maps.get(ino)
        if rmap is None:
            return None
        if rmap.expires < trio.current_time():
            del self._read_maps[ino]
            return None
        if end > max(rmap.committed, self._pending.get(ino, 0)):
            return None  # the file may have grown since
        blocks = rmap.blocks
        for index in range(first, last + 1):
            if index not in blocks:
                return None
        return rmap

    async def _read_map(self, ino: int, first: int, last: int) -> _ReadMap:
        start = first - first % READ_MAP_WINDOW
        count = max(READ_MAP_WINDOW, last - start + 1)
        committed, rows = await self._call("layout", ino, start, count, True, idempotent=True)
        rmap = self._read_maps.get(ino)
        now = trio.current_time()
        if (
            rmap is None
            or rmap.expires < now
            or rmap.committed != committed
            or len(rmap.blocks) > MAX_READ_MAP_BLOCKS
        ):
            if len(self._read_maps) >= MAX_CACHED_FILES and ino not in self._read_maps:
                del self._read_maps[next(iter(self._read_maps))]
            rmap = self._read_maps[ino] = _ReadMap(now + READ_MAP_TTL, committed)
        blocks = rmap.blocks
        for index in range(start, start + count):
            blocks[index] = None
        for index, block_id, addrs, holds in rows:
            blocks[index] = (block_id, addrs, holds)
        return rmap

    async def _read_mapped(
        self, ino: int, rmap: _ReadMap, offset: int, size: int, bs: int, cached: bool
    ) -> bytes | memoryview:
        length = max(rmap.committed, self._pending.get(ino, 0))
        end = min(offset + size, length)
        if offset >= end:
            return b""
        blocks = rmap.blocks
        ranges = []
        for index in range(offset // bs, (end - 1) // bs + 1):
            lo = max(offset, index * bs)
            hi = min(end, (index + 1) * bs)
            ranges.append((blocks.get(index), lo - index * bs, hi - lo, cached))
        if len(ranges) == 1:
            return await self._read_block(*ranges[0])
        out: list[bytes | memoryview] = [b""] * len(ranges)
        stale = False

        async def fetch(i: int) -> None:
            nonlocal stale
            try:
                out[i] = await self._read_block(*ranges[i])
            except _Stale:
                stale = True

        await self._each(fetch, list(range(len(ranges))))
        if stale:
            raise _Stale
        return b"".join(out)

    async def _read_block(
        self, block: tuple | None, offset: int, size: int, cached: bool = False
    ) -> bytes | memoryview:
        """`size` bytes of a block from the first replica that answers (the one on this host
        first); holes are zeros. _Stale when the map was `cached` and no replica has it; EIO
        when the block holds data (the master says) and no replica has it: it was lost."""
        if block is None:
            return bytes(size)
        block_id, addrs = block[0], block[1]
        holds = len(block) > 2 and block[2]
        sc = self._sc
        if sc is not None and len(addrs) > 1:
            addrs = sorted(addrs, key=lambda a: not sc.is_local(a))
        last: ClusterError | None = None
        for addr in addrs:
            worker = await sc.worker(addr) if sc is not None else None
            try:
                data = None
                if worker is not None:
                    try:
                        data = await sc.read(worker, block_id, offset, size)
                    except ClusterError as exc:
                        if exc.errno == errno.ENOENT:
                            raise
                        last = exc  # a bad checksum or a broken link: ask the worker itself
                if data is None:
                    data = await self._workers.call(
                        addr, "read_block", block_id, offset, size, idempotent=True
                    )
            except ClusterError as exc:
                if exc.errno != errno.ENOENT:  # ENOENT: allocated, never written here
                    last = exc
                continue
            if len(data) < size:
                data = b"".join((data, bytes(size - len(data))))
            return data
        if last is None:
            if cached:
                raise _Stale
            if holds:
                raise ClusterError(
                    errno.EIO, f"block {block_id} held data and no replica has it: lost"
                )
            return bytes(size)
        raise ClusterError(last.errno, f"block {block_id}: no replica readable: {last.strerror}")

    async def _settle(self, ino: int, durable: bool) -> None:
        """Wait for the file's writes and raise a kept loss; with `durable`, have the workers
        flush the blocks written since the last durable commit to their disks (blocks
        written through short-circuit included: the worker syncs the same files)."""
        await self._behind.drain(ino)
        self._behind.check(ino)
        if durable:
            await self._sync_blocks(ino)
        elif len(self._unsynced.get(ino, ())) > MAX_UNSYNCED:
            self._unsynced.pop(ino, None)  # nobody asked; do not grow without bound

    async def sync(self, ino: int) -> None:
        """fsync of a file with nothing left to commit: the blocks written since its last
        durable commit and the master's journal reach their disks."""
        await self._settle(ino, True)
        await self.sync_journal()

    async def commit(
        self, ino: int, size: int, mtime_ns: int | None = None, *, durable: bool = False
    ) -> Attr:
        """`_settle` the file, then publish `size`; with `durable` (fsync) the master's
        journal holds the new length on disk before this returns (otherwise the blocks and
        the length may sit in page caches). With a kept loss (see `write`) only the length
        below the lost data is published, and the loss is raised."""
        try:
            await self._settle(ino, durable)
        except WriteLost as lost:
            # what was stored below the loss stays (the master keeps the longer length)
            if lost.offset > 0:
                await self._call("commit", ino, min(size, lost.offset), mtime_ns, idempotent=True)
            raise
        attr = await self._attr("commit", ino, size, mtime_ns, idempotent=True)
        if durable:
            await self.sync_journal()  # the new length is on the master's disk too
        if self._pending.get(ino, -1) <= size:
            self._pending.pop(ino, None)
        rmap = self._read_maps.get(ino)
        if rmap is not None:
            rmap.committed = attr.size
        return attr
