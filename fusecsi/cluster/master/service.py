"""The master's RPC methods: namespace calls, block placement, quotas, the worker registry.

Reads are plain functions (answered inline by the protocol's reader); mutations are async:
plan (validate) -> apply in memory -> journal -> wait for the group-committed fsync -> reply.
Nothing awaits between plan and apply, so each mutation is atomic against the others.
"""

from __future__ import annotations

import errno
import logging
import stat
import time
from dataclasses import dataclass

import trio

from fusecsi.cluster.checks import check_int, fail, opt_int
from fusecsi.cluster.master.journal import Journal
from fusecsi.cluster.master.namespace import Namespace
from fusecsi.cluster.protocol import Pool, RPCError
from fusecsi.logs import fields

log = logging.getLogger(__name__)

ID_RESERVE = 1 << 16
WORKER_DEAD_AFTER = 5.0
MAX_ALLOC = 64
CHECKPOINT_INTERVAL = 300.0  # seconds; a checkpoint also follows every `checkpoint_records`


@dataclass
class WorkerState:
    worker_id: str
    address: str
    capacity: int = 0
    free: int = 0
    seen: float = 0.0
    planned: int = 0  # bytes placed since the last heartbeat


class MasterService:
    def __init__(
        self,
        ns: Namespace,
        journal: Journal,
        pool: Pool,
        *,
        replication: int = 1,
        checkpoint_records: int = 200_000,
    ) -> None:
        self.ns = ns
        self.journal = journal
        self.pool = pool
        self.replication = replication
        self.checkpoint_records = checkpoint_records
        self.durable_limit = ns.id_limit
        ns.next_id = max(ns.next_id, ns.id_limit)  # ids handed out before a crash stay unused
        self._reserve_lock = trio.Lock()
        self.live: dict[str, WorkerState] = {}
        self.deletions: dict[str, list[int]] = {}
        self._checkpointing = False
        self._nursery: trio.Nursery | None = None

    def handlers(self) -> dict:
        names = (
            "lookup getattr setattr mkdir create symlink unlink rmdir rename link readdir "
            "readlink getxattr setxattr listxattr removexattr statfs layout allocate commit "
            "set_quota get_quota resolve mkdirs remove_tree create_batch register heartbeat "
            "unregister cluster_info"
        )
        return {name: getattr(self, name) for name in names.split()}

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while True:
                await trio.sleep(CHECKPOINT_INTERVAL)
                if self.journal.records_in_segment:
                    await self.checkpoint()

    # ------------------------------------------------------------ plumbing

    async def _commit(self, record: list):
        result = self.ns.apply(record)
        ticket = self.journal.append(record)
        self._maybe_checkpoint()
        await self.journal.sync(ticket)
        return result

    def _maybe_checkpoint(self) -> None:
        if (
            self.journal.records_in_segment >= self.checkpoint_records
            and not self._checkpointing
            and self._nursery is not None
        ):
            self._nursery.start_soon(self.checkpoint)

    async def checkpoint(self) -> None:
        if self._checkpointing:
            return
        self._checkpointing = True
        try:
            self.journal.rotate()
            await self.journal.checkpoint(self.ns.dump)
        finally:
            self._checkpointing = False

    async def _ids(self, count: int) -> int:
        """`count` fresh ids; the range they come from is durably reserved first."""
        ns = self.ns
        while ns.next_id + count > self.durable_limit:
            async with self._reserve_lock:
                if ns.next_id + count <= self.durable_limit:
                    break
                limit = ns.next_id + count + ID_RESERVE
                await self._commit(["ids", limit])
                self.durable_limit = max(self.durable_limit, limit)
        first = ns.next_id
        ns.next_id += count
        return first

    @staticmethod
    def _now() -> int:
        return time.time_ns()

    def _free_blocks(self, freed: list) -> None:
        """Queue freed blocks for their workers (delivered with the next heartbeat)."""
        for block_id, workers in freed:
            for wid in workers:
                self.deletions.setdefault(wid, []).append(block_id)

    async def _delete_now(self, freed: list) -> None:
        """Tell the workers at once, so a client writing through a stale block map is refused
        (ENOENT) instead of writing into a freed block; what fails waits for a heartbeat."""
        by_worker: dict[str, list[int]] = {}
        for block_id, workers in freed:
            for wid in workers:
                by_worker.setdefault(wid, []).append(block_id)

        async def send(wid: str, ids: list[int]) -> None:
            try:
                await self.pool.call(self.ns.workers[wid], "delete_blocks", ids, time_limit=5)
            except (RPCError, KeyError):
                self.deletions.setdefault(wid, []).extend(ids)

        async with trio.open_nursery() as nursery:
            for wid, ids in by_worker.items():
                nursery.start_soon(send, wid, ids)

    # ------------------------------------------------------------ reads

    def lookup(self, parent, name):
        return self.ns.child(parent, name).attr()

    def getattr(self, ino):
        return self.ns.get(ino).attr()

    def readdir(self, ino, cookie=0, limit=1000):
        return self.ns.readdir(ino, cookie, limit)

    def readlink(self, ino):
        node = self.ns.get(ino)
        if node.target is None:
            raise fail(errno.EINVAL, f"inode {ino} is not a symlink")
        return node.target

    def getxattr(self, ino, name):
        return self.ns.getxattr(ino, name)

    def listxattr(self, ino):
        node = self.ns.get(ino)
        return list(node.xattrs) if node.xattrs else []

    def resolve(self, path):
        return self.ns.resolve(path).attr()

    def get_quota(self, ino):
        return self.ns.quota_info(self.ns.nearest_quota(ino))

    def statfs(self):
        workers = self.live_workers()
        total_inodes = 1 << 32
        return {
            "total_bytes": sum(w.capacity for w in workers),
            "free_bytes": sum(w.free for w in workers),
            "total_inodes": total_inodes,
            "free_inodes": max(0, total_inodes - self.ns.statfs_inodes()),
            "block_size": self.ns.block_size,
        }

    def cluster_info(self):
        now = time.monotonic()
        return {
            "block_size": self.ns.block_size,
            "replication": self.replication,
            "inodes": self.ns.statfs_inodes(),
            "workers": [
                {
                    "id": wid,
                    "address": addr,
                    "live": wid in self.live and now - self.live[wid].seen < WORKER_DEAD_AFTER,
                    "capacity": self.live[wid].capacity if wid in self.live else 0,
                    "free": self.live[wid].free if wid in self.live else 0,
                }
                for wid, addr in sorted(self.ns.workers.items())
            ],
        }

    def layout(self, ino, first, count):
        """[committed size, [[index, block id, [worker addresses, live first]], ...]]."""
        node = self.ns.file(ino)
        check_int(first, "first")
        count = min(check_int(count, "count"), 4096)
        blocks = node.blocks
        out = []
        if blocks:
            for index in range(first, first + count):
                block = blocks.get(index)
                if block is not None:
                    out.append([index, block[0], self._addresses(block[1])])
        return [node.size, out]

    def _addresses(self, worker_ids: list[str]) -> list[str]:
        now = time.monotonic()
        live, dead = [], []
        for wid in worker_ids:
            addr = self.ns.workers.get(wid)
            if addr is None:
                continue
            state = self.live.get(wid)
            (live if state and now - state.seen < WORKER_DEAD_AFTER else dead).append(addr)
        return live + dead

    def live_workers(self) -> list[WorkerState]:
        now = time.monotonic()
        return [w for w in self.live.values() if now - w.seen < WORKER_DEAD_AFTER]

    # ------------------------------------------------------------ namespace mutations

    async def _make(self, parent, name, mode, uid, gid, target=None):
        ino = await self._ids(1)
        record = self.ns.plan_mk(parent, name, ino, mode, uid, gid, self._now(), target)
        return await self._commit(record)

    async def mkdir(self, parent, name, mode, uid, gid):
        check_int(mode, "mode")
        return await self._make(parent, name, stat.S_IFDIR | (mode & 0o7777), uid, gid)

    async def create(self, parent, name, mode, uid, gid):
        check_int(mode, "mode")
        return await self._make(parent, name, stat.S_IFREG | (mode & 0o7777), uid, gid)

    async def symlink(self, parent, name, target, uid, gid):
        return await self._make(parent, name, stat.S_IFLNK | 0o777, uid, gid, target)

    async def create_batch(self, parent, names, mode, uid, gid):
        """Create many empty files in one record (bulk loads and tests)."""
        if not isinstance(names, list) or not names:
            raise fail(errno.EINVAL, "names must be a non-empty list")
        check_int(mode, "mode")
        first = await self._ids(len(names))
        record = self.ns.plan_batch(
            parent, names, first, stat.S_IFREG | (mode & 0o7777), uid, gid, self._now()
        )
        return await self._commit(record)

    async def unlink(self, parent, name):
        self._free_blocks(await self._commit(self.ns.plan_rm(parent, name, False, self._now())))

    async def rmdir(self, parent, name):
        await self._commit(self.ns.plan_rm(parent, name, True, self._now()))

    async def rename(self, parent, name, new_parent, new_name, flags=0):
        record = self.ns.plan_mv(parent, name, new_parent, new_name, flags, self._now())
        self._free_blocks(await self._commit(record))

    async def link(self, ino, new_parent, new_name):
        return await self._commit(self.ns.plan_ln(ino, new_parent, new_name, self._now()))

    async def setattr(self, ino, mode=None, uid=None, gid=None, size=None, atime=None, mtime=None):
        if size is not None:
            await self._truncate_tail(ino, check_int(size, "size"))
        record = self.ns.plan_attr(ino, mode, uid, gid, size, atime, mtime, self._now())
        await self._delete_now(await self._commit(record))
        return self.ns.get(ino).attr()

    async def _truncate_tail(self, ino, size: int) -> None:
        """Cut the block that will hold the new end, so bytes past it read as zeros later."""
        node = self.ns.file(ino)
        keep = min(size, node.size)
        bs = self.ns.block_size
        block = node.blocks.get(keep // bs) if keep % bs else None
        if block is None:
            return
        block_id, workers = block[0], list(block[1])
        lost = []
        for wid in workers:
            addr = self.ns.workers.get(wid)
            try:
                if addr is None:
                    raise RPCError(errno.EHOSTUNREACH, "unknown worker")
                await self.pool.call(
                    addr, "truncate_block", block_id, keep % bs, idempotent=True, time_limit=10
                )
            except RPCError as exc:
                if wid in {w.worker_id for w in self.live_workers()}:
                    raise fail(
                        errno.EIO, f"cannot truncate block {block_id} on {addr}: {exc}"
                    ) from None
                lost.append(wid)
        if lost and len(lost) == len(workers):
            raise fail(errno.EIO, f"no replica of block {block_id} is reachable to truncate")
        if lost:
            await self._commit(["drop", ino, keep // bs, lost])

    async def setxattr(self, ino, name, value, flags=0):
        await self._commit(self.ns.plan_xset(ino, name, value, flags, self._now()))

    async def removexattr(self, ino, name):
        await self._commit(self.ns.plan_xrm(ino, name, self._now()))

    async def set_quota(self, ino, max_bytes, max_inodes):
        return await self._commit(self.ns.plan_quota(ino, max_bytes, max_inodes))

    async def commit(self, ino, size, mtime=None):
        return await self._commit(self.ns.plan_commit(ino, size, mtime, self._now()))

    async def mkdirs(self, path, mode=0o755, uid=0, gid=0):
        if not isinstance(path, str) or not path.startswith("/"):
            raise fail(errno.EINVAL, "a path must be absolute")
        check_int(mode, "mode")
        node = self.ns.inodes[1]
        for part in path.split("/"):
            if not part:
                continue
            name = part.encode()
            child = self.ns.dir(node.ino).entries.get(name)
            if child is None:
                try:
                    await self.mkdir(node.ino, name, mode, uid, gid)
                except OSError as exc:
                    if exc.errno != errno.EEXIST:
                        raise
            node = self.ns.child(node.ino, name)
        self.ns.dir(node.ino)
        return node.attr()

    async def remove_tree(self, path):
        if not isinstance(path, str) or not path.startswith("/"):
            raise fail(errno.EINVAL, "a path must be absolute")
        parts = [p for p in path.split("/") if p]
        if not parts:
            raise fail(errno.EBUSY, "refusing to remove the root")
        try:
            parent = self.ns.resolve("/" + "/".join(parts[:-1]))
            self.ns.child(parent.ino, parts[-1].encode())
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise
        record = self.ns.plan_rmtree(parent.ino, parts[-1].encode(), self._now())
        self._free_blocks(await self._commit(record))
        return True

    # ------------------------------------------------------------ data placement

    async def allocate(self, ino, first, count, end):
        """Blocks `first..first+count-1` of a file, allocated where missing, and the length
        the file may grow to before the client must ask again (quota headroom)."""
        node = self.ns.file(ino)
        check_int(first, "first")
        check_int(count, "count", 1, MAX_ALLOC)
        check_int(end, "end")
        if end > node.size:
            self.ns._check_growth(node, end - node.size)
        if any(i not in node.blocks for i in range(first, first + count)):
            self._place(0)  # fail early with ENOSPC
            base = await self._ids(count)
            # the file may have changed while the ids were reserved: decide now
            node = self.ns.file(ino)
            missing = [i for i in range(first, first + count) if i not in node.blocks]
            needed = sum(1 for i in missing if i * self.ns.block_size < end)
            targets = self._place(len(missing), needed)
            placed = zip(missing, targets, strict=False)
            blocks = [[index, base + k, t] for k, (index, t) in enumerate(placed)]
            if blocks:
                await self._commit(["alloc", ino, blocks])
        node = self.ns.file(ino)
        room = self.ns.headroom(node)
        grant = (first + count) * self.ns.block_size
        if room is not None:
            grant = min(grant, node.size + room)
        return {"blocks": self.layout(ino, first, count)[1], "grant": max(grant, end)}

    def _place(self, count: int, required: int | None = None) -> list[list[str]]:
        """Workers for `count` new blocks: the first `required` (default all) must fit, the
        rest are placed only while there is room (allocation ahead of the writer)."""
        bs = self.ns.block_size
        required = count if required is None else required
        live = self.live_workers()
        if not any(w.free - w.planned >= bs for w in live):
            raise fail(errno.ENOSPC, "no live worker has free space")
        copies = min(self.replication, len(live))
        out = []
        for k in range(count):
            workers = [w for w in live if w.free - w.planned >= bs]
            if not workers:
                if k < required:
                    raise fail(errno.ENOSPC, "no live worker has free space")
                break
            workers.sort(key=lambda w: w.free - w.planned, reverse=True)
            chosen = workers[:copies]
            for w in chosen:
                w.planned += bs
            out.append([w.worker_id for w in chosen])
        return out

    # ------------------------------------------------------------ workers

    async def register(self, worker_id, address, capacity, free, block_ids):
        if not isinstance(worker_id, str) or not isinstance(address, str):
            raise fail(errno.EINVAL, "worker id and address must be strings")
        check_int(capacity, "capacity")
        check_int(free, "free")
        if self.ns.workers.get(worker_id) != address:
            await self._commit(["worker", worker_id, address])
        self.live[worker_id] = WorkerState(worker_id, address, capacity, free, time.monotonic())
        known = set()
        for node in self.ns.inodes.values():
            if node.blocks:
                for block_id, workers in node.blocks.values():
                    if worker_id in workers:
                        known.add(block_id)
        orphans = [b for b in block_ids if b not in known]
        log.info(
            "worker registered",
            extra=fields(
                worker=worker_id, address=address, blocks=len(block_ids), orphans=len(orphans)
            ),
        )
        return {"block_size": self.ns.block_size, "delete": orphans}

    def unregister(self, worker_id):
        """A worker shutting down: place nothing more on it (its blocks stay known)."""
        if self.live.pop(worker_id, None) is not None:
            log.info("worker left", extra=fields(worker=worker_id))

    def heartbeat(self, worker_id, capacity, free):
        state = self.live.get(worker_id)
        if state is None:
            return {"known": False, "delete": []}
        state.capacity = opt_int(capacity, "capacity") or 0
        state.free = opt_int(free, "free") or 0
        state.planned = 0
        state.seen = time.monotonic()
        return {"known": True, "delete": self.deletions.pop(worker_id, [])}
