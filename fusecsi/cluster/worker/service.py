"""The worker's RPC methods (block reads and writes for clients) and its link to the master."""

from __future__ import annotations

import errno
import logging
import os
from collections import OrderedDict
from functools import partial

import outcome
import trio

from fusecsi.cluster.checks import check_int
from fusecsi.cluster.worker.store import BlockStore
from fusecsi.logs import fields
from fusecsi.rpc.errors import RPCError
from fusecsi.rpc.pool import Pool

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = 1.0
MAX_TOMBSTONES = 100_000
REPORT_LIMIT = 5.0  # seconds a sync waits to tell the master which blocks hold data
# the master is gone or belongs to another cluster (ESTALE): ask the next one
NEXT_MASTER = frozenset({errno.ECONNREFUSED, errno.ECONNRESET, errno.ETIMEDOUT, errno.ESTALE})


class WorkerService:
    def __init__(
        self,
        store: BlockStore,
        pool: Pool,
        masters: list[str],
        advertise: str,
        local_socket: str | None = None,
    ) -> None:
        self.store = store
        self.local_socket = local_socket
        self.pool = pool
        self.masters = masters
        self.advertise = advertise
        self.block_size = 1 << 30  # until the master says otherwise
        self.limiter = trio.CapacityLimiter(8)
        self._locks: dict[int, trio.Lock] = {}
        self._users: dict[int, int] = {}
        # blocks the master freed: a late write from a client with a stale map must not
        # bring one back to life
        self.tombstones: OrderedDict[int, None] = OrderedDict()
        self.registered = trio.Event()
        self._master = 0
        self._refused: set[str] = set()  # masters of another cluster (logged)
        # blocks written since the master last heard of them: it records that they hold
        # data, so a copy lost with a data dir reads EIO instead of zeros
        self._written: set[int] = set()

    def handlers(self) -> dict:
        return {
            "write_block": self.write_block,
            "read_block": self.read_block,
            "truncate_block": self.truncate_block,
            "delete_blocks": self.delete_blocks,
            "sync_blocks": self.sync_blocks,
            "worker_info": self.worker_info,
        }

    async def _locked(self, block_id: int, fn, *args):
        lock = self._locks.get(block_id)
        if lock is None:
            lock = self._locks[block_id] = trio.Lock()
        self._users[block_id] = self._users.get(block_id, 0) + 1
        try:
            async with lock:
                return await trio.to_thread.run_sync(fn, block_id, *args, limiter=self.limiter)
        finally:
            left = self._users[block_id] - 1
            if left:
                self._users[block_id] = left
            else:
                del self._users[block_id]
                del self._locks[block_id]

    def _check_range(self, block_id, offset, length) -> None:
        check_int(block_id, "block id", 1)
        check_int(offset, "offset")
        if offset + length > self.block_size:
            raise OSError(errno.EINVAL, f"range ends past the block size {self.block_size}")

    def _check_live(self, block_id: int) -> None:
        if block_id in self.tombstones:
            raise OSError(errno.ENOENT, f"block {block_id} was deleted")

    def _write(self, block_id: int, offset: int, data: bytes) -> None:
        self._check_live(block_id)  # again under the block's lock: a delete may have won it
        self.store.write(block_id, offset, data)

    async def write_block(self, block_id, offset, data):
        if not isinstance(data, bytes):
            raise OSError(errno.EINVAL, "data must be bytes")
        self._check_range(block_id, offset, len(data))
        self._check_live(block_id)
        await self._locked(block_id, self._write, offset, data)
        self._written.add(block_id)  # here, not in the thread: the heartbeat reads the set
        return None

    def _hand_out(self, block_id: int, writable: bool) -> tuple[int, int]:
        self._check_live(block_id)
        return self.store.hand_out(block_id, writable)

    async def open_local(self, block_id, writable: bool) -> tuple[int, int]:
        """Descriptors of a block for a short-circuit client (served by worker/shortcircuit.py),
        under the checks of the TCP path; a deleted block is never created again."""
        self._check_range(block_id, 0, 0)
        self._check_live(block_id)
        fds = await self._locked(block_id, self._hand_out, writable)
        if writable:
            self._written.add(block_id)
        return fds

    async def read_block(self, block_id, offset, size):
        self._check_range(block_id, offset, check_int(size, "size"))
        return await self._locked(block_id, self.store.read, offset, size)

    async def truncate_block(self, block_id, length):
        self._check_range(block_id, length, 0)
        await self._locked(block_id, self.store.truncate, length)

    async def delete_blocks(self, block_ids, cluster_id=None):
        """Only this worker's own cluster deletes blocks: a master names its cluster id."""
        if not isinstance(block_ids, list):
            raise OSError(errno.EINVAL, "block ids must be a list")
        if cluster_id is None or cluster_id != self.store.cluster_id:
            raise OSError(errno.ESTALE, f"not a master of cluster {self.store.cluster_id}")
        await self._delete(block_ids)

    async def _delete(self, block_ids: list) -> None:
        for block_id in block_ids:
            check_int(block_id, "block id", 1)
            self.tombstones[block_id] = None
            self._written.discard(block_id)
            await self._locked(block_id, self.store.delete)
        while len(self.tombstones) > MAX_TOMBSTONES:
            self.tombstones.popitem(last=False)

    async def sync_blocks(self, block_ids):
        """Flush blocks to disk (a client's fsync); a block that no longer exists is skipped."""
        if not isinstance(block_ids, list):
            raise OSError(errno.EINVAL, "block ids must be a list")
        for block_id in block_ids:
            check_int(block_id, "block id", 1)
        sync = partial(trio.to_thread.run_sync, self.store.sync, block_ids, limiter=self.limiter)
        async with trio.open_nursery() as nursery:  # the report rides along with the disk
            nursery.start_soon(self._report, [b for b in block_ids if b in self._written])
            synced = await outcome.acapture(sync)  # an error keeps its errno (no group)
            if isinstance(synced, outcome.Error):
                nursery.cancel_scope.cancel()
        synced.unwrap()

    async def _report(self, block_ids: list[int]) -> None:
        """Tell the master these blocks hold data before a client's fsync is answered (the
        client then syncs the master's journal). If no master takes it in time, the next
        heartbeat carries it."""
        if not block_ids:
            return
        with trio.move_on_after(REPORT_LIMIT):
            try:
                if await self._call_master("blocks_written", self.store.worker_id, block_ids):
                    self._written.difference_update(block_ids)
                    return
            except RPCError as exc:
                log.warning("could not report written blocks", extra=fields(err=str(exc)))

    def worker_info(self):
        capacity, free = self.store.space()
        return {
            "id": self.store.worker_id,
            "address": self.advertise,
            "capacity": capacity,
            "free": free,
            "block_size": self.block_size,
            "pid": os.getpid(),
            "registered": self.registered.is_set(),
            "local_socket": self.local_socket,
        }

    # ------------------------------------------------------------ master link

    async def _call_master(self, method: str, *args):
        """Try the masters in turn, starting with the one that answered last."""
        last: Exception | None = None
        for k in range(len(self.masters)):
            i = (self._master + k) % len(self.masters)
            try:
                result = await self.pool.call(self.masters[i], method, *args, idempotent=True)
            except RPCError as exc:
                if exc.errno not in NEXT_MASTER:
                    raise
                last = RPCError(exc.errno, f"{self.masters[i]}: {exc.strerror}")
                if exc.errno == errno.ESTALE and self.masters[i] not in self._refused:
                    self._refused.add(self.masters[i])  # said once per master
                    log.error(
                        "refusing a master of another cluster",
                        extra=fields(master=self.masters[i], err=exc.strerror),
                    )
                continue
            self._master = i
            return result
        raise last or RPCError(errno.ECONNREFUSED, "no master")

    async def _register(self) -> None:
        capacity, free = await trio.to_thread.run_sync(self.store.space)
        block_ids = await trio.to_thread.run_sync(self.store.block_ids)
        mine = self.store.cluster_id
        reply = await self._call_master(
            "register", self.store.worker_id, self.advertise, capacity, free, block_ids, mine
        )
        theirs = reply.get("cluster_id")
        if theirs is None or (mine is not None and theirs != mine):  # touch nothing
            raise RPCError(errno.ESTALE, f"a master of cluster {theirs}, not {mine}")
        if mine is None:
            await trio.to_thread.run_sync(self.store.adopt_cluster, theirs)
        self.block_size = reply["block_size"]
        if reply["delete"]:
            log.info("deleting orphan blocks", extra=fields(count=len(reply["delete"])))
            await self._delete(reply["delete"])
        self.registered.set()
        log.info(
            "registered",
            extra=fields(worker=self.store.worker_id, address=self.advertise, cluster_id=theirs),
        )

    async def leave(self) -> None:
        """Tell the master this worker is going away, so it stops placing blocks here."""
        with trio.move_on_after(2):
            try:
                await self._call_master("unregister", self.store.worker_id)
            except RPCError:
                pass

    async def heartbeats(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        known = False
        while True:
            try:
                if not known:
                    await self._register()
                    known = True
                if self.store.external:
                    await trio.to_thread.run_sync(self.store.refresh, limiter=self.limiter)
                capacity, free = self.store.space()
                written = list(self._written)
                reply = await self._call_master(
                    "heartbeat", self.store.worker_id, capacity, free, written
                )
                known = reply["known"]
                if known:  # only a master this worker registered with (its cluster's)
                    self._written.difference_update(written)
                    if reply["delete"]:
                        await self._delete(reply["delete"])
            except RPCError as exc:
                log.warning("master unreachable", extra=fields(err=str(exc)))
                known = False
            await trio.sleep(HEARTBEAT_INTERVAL)
