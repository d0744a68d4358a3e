"""The master's RPC methods: namespace calls, block placement, quotas, the worker registry.

Reads and most mutations are plain functions, answered inline by the protocol's reader: plan
(validate) -> apply in memory -> write the journal record -> reply. Nothing awaits between
plan and apply, so each mutation is atomic against the others. The reply comes once the record
is written, not synced (see journal.py): an acknowledged change survives a crash of the master
process; `sync_journal` waits until everything before it is on disk. What must never be
undone by a power loss waits for the sync itself:
- `mkvolume` and `sync_journal` answer only then;
- id ranges are reserved (and synced) ahead, so an inode or block id handed out is never
  handed out again;
- blocks freed by unlink/rename/remove_tree are deleted on workers only once the freeing
  record is synced (a lost record would otherwise bring back a file whose data is gone);
- a setattr that changes a file's length answers once synced (workers cut or delete blocks);
- a registering worker is told to delete unknown blocks only once the state that does not
  know them is synced.

Workers and clients check the cluster id (made when the data dir was formatted) and refuse a
master with another one (ESTALE): that master holds another namespace. EAGAIN always means
nothing was done: the caller may repeat any call so answered.
"""

from __future__ import annotations

import errno
import logging
import stat
import time
import uuid
from collections import deque
from dataclasses import dataclass

import trio

from fusecsi.cluster.checks import check_int, fail, opt_int
from fusecsi.cluster.master.journal import Journal
from fusecsi.cluster.master.namespace import Namespace
from fusecsi.logs import fields
from fusecsi.rpc.errors import RPCError
from fusecsi.rpc.pool import Pool

log = logging.getLogger(__name__)

ID_RESERVE = 1 << 20  # ids reserved per journal record; more are reserved at half used
WORKER_DEAD_AFTER = 5.0
MAX_ALLOC = 64
CHECKPOINT_INTERVAL = 300.0  # seconds; a checkpoint also follows every `checkpoint_records`
# after a start, "no room" means EAGAIN (retry) for this long, unless every worker the
# namespace knows is back: they re-register within a few heartbeats
STARTUP_GRACE = 2 * WORKER_DEAD_AFTER
MARK_RECORD = 65536  # block ids per "data" journal record
DEVICES = (stat.S_IFCHR, stat.S_IFBLK)
SPECIAL = (stat.S_IFIFO, stat.S_IFSOCK, *DEVICES)


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
        cluster_id: str | None = None,
    ) -> None:
        self.ns = ns
        self.cluster_id = cluster_id or str(uuid.uuid4())
        self.started = time.monotonic()
        self.journal = journal
        self.pool = pool
        self.replication = replication
        self.checkpoint_records = checkpoint_records
        self.durable_limit = ns.id_limit
        ns.next_id = max(ns.next_id, ns.id_limit)  # ids handed out before a crash stay unused
        self._reserve_lock = trio.Lock()
        self._reserving = False
        self.live: dict[str, WorkerState] = {}
        self.joined: set[str] = set()  # workers registered since this master started
        self.deletions: dict[str, list[int]] = {}  # synced: handed out with heartbeats
        self._unsynced_frees: deque[tuple[int, list]] = deque()  # (journal ticket, blocks)
        self._checkpointing = False
        self._nursery: trio.Nursery | None = None

    def handlers(self) -> dict:
        names = (
            "lookup getattr setattr mkdir create mknod symlink unlink rmdir rename link readdir "
            "readlink getxattr setxattr listxattr removexattr statfs layout allocate commit "
            "set_quota get_quota resolve mkdirs remove_tree create_batch register heartbeat "
            "unregister cluster_info mkvolume sync_journal blocks_written"
        )
        return {name: getattr(self, name) for name in names.split()}

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self._reserve(0)
            task_status.started()
            while True:
                await trio.sleep(CHECKPOINT_INTERVAL)
                if self.journal.records_in_segment:
                    await self.checkpoint()

    # ------------------------------------------------------------ plumbing

    def _commit(self, record: list):
        """Apply and journal a planned record (written, not yet synced)."""
        result = self.ns.apply(record)
        self.journal.append(record)
        self._maybe_checkpoint()
        return result

    async def _commit_durable(self, record: list):
        result = self._commit(record)
        await self.journal.sync_all()
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

    def _ids(self, count: int) -> int:
        """`count` fresh ids from the durably reserved range; the next range is reserved in
        the background once half of this one is used."""
        ns = self.ns
        if ns.next_id + count > self.durable_limit:
            self._reserve_soon()
            # only if a sync has stalled for ~half a million ids: the disk is in trouble
            raise fail(errno.EAGAIN, "inode numbers are being reserved; retry")
        first = ns.next_id
        ns.next_id += count
        if self.durable_limit - ns.next_id < ID_RESERVE // 2:
            self._reserve_soon()
        return first

    async def _ids_waiting(self, count: int) -> int:
        while self.ns.next_id + count > self.durable_limit:
            await self._reserve(count)
        return self._ids(count)

    def _reserve_soon(self) -> None:
        if not self._reserving and self._nursery is not None:
            self._reserving = True
            self._nursery.start_soon(self._reserve, 0)

    async def _reserve(self, count: int) -> None:
        """Durably reserve room for `count` ids plus ID_RESERVE of headroom."""
        try:
            async with self._reserve_lock:
                if self.ns.next_id + count + ID_RESERVE // 2 <= self.durable_limit:
                    return
                limit = self.ns.next_id + count + ID_RESERVE
                await self._commit_durable(["ids", limit])
                self.durable_limit = max(self.durable_limit, limit)
        finally:
            self._reserving = False

    @staticmethod
    def _now() -> int:
        return time.time_ns()

    def _free_blocks(self, freed: list) -> None:
        """Queue blocks freed by the last record; their workers get them with a heartbeat
        once that record is synced."""
        if freed:
            self._unsynced_frees.append((self.journal.written, freed))

    def _release_frees(self) -> None:
        synced, pending = self.journal.synced, self._unsynced_frees
        while pending and pending[0][0] <= synced:
            for block_id, workers in pending.popleft()[1]:
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
                await self.pool.call(
                    self.ns.workers[wid], "delete_blocks", ids, self.cluster_id, time_limit=5
                )
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

    def statfs(self, ino=None):
        """The cluster's totals; for a path (`ino`) under a quota, the nearest quota's limits
        instead (free: what the quota leaves, never more than the cluster has), as df in a
        volume should show."""
        workers = self.live_workers()
        total_inodes = 1 << 32
        out = {
            "total_bytes": sum(w.capacity for w in workers),
            "free_bytes": sum(w.free for w in workers),
            "total_inodes": total_inodes,
            "free_inodes": max(0, total_inodes - self.ns.statfs_inodes()),
            "block_size": self.ns.block_size,
        }
        if ino is not None:
            try:
                node = self.ns.nearest_quota(ino)
            except OSError as exc:
                if exc.errno != errno.ENODATA:
                    raise
                return out
            for kind, limit, used in zip(("bytes", "inodes"), node.quota, node.used, strict=True):
                if limit is not None:
                    out[f"total_{kind}"] = limit
                    out[f"free_{kind}"] = min(max(0, limit - used), out[f"free_{kind}"])
        return out

    def cluster_info(self):
        now = time.monotonic()
        return {
            "cluster_id": self.cluster_id,
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

    def layout(self, ino, first, count, holds=False):
        """[committed size, [[index, block id, [worker addresses, live first]], ...]]; with
        `holds` each row ends with "holds data": a block a worker reported writing, which
        is lost (EIO), not a hole, when no replica has it. (Opt-in: a client from before
        unpacks three fields.)"""
        node = self.ns.file(ino)
        rows = self._rows(node, first, count)
        if holds:
            holding = self.ns.holding
            rows = [[*row, row[1] in holding] for row in rows]
        return [node.size, rows]

    def _rows(self, node, first, count) -> list[list]:
        """[[index, block id, [worker addresses, live first]], ...] of existing blocks."""
        check_int(first, "first")
        count = min(check_int(count, "count"), 4096)
        blocks = node.blocks
        out = []
        if blocks:
            for index in range(first, first + count):
                block = blocks.get(index)
                if block is not None:
                    out.append([index, block[0], self._addresses(block[1])])
        return out

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

    def _make(self, parent, name, mode, uid, gid, target=None, rdev=0):
        ino = self._ids(1)
        record = self.ns.plan_mk(parent, name, ino, mode, uid, gid, self._now(), target, rdev)
        return self._commit(record)

    def mkdir(self, parent, name, mode, uid, gid):
        check_int(mode, "mode")
        return self._make(parent, name, stat.S_IFDIR | (mode & 0o7777), uid, gid)

    def create(self, parent, name, mode, uid, gid):
        check_int(mode, "mode")
        return self._make(parent, name, stat.S_IFREG | (mode & 0o7777), uid, gid)

    def mknod(self, parent, name, mode, rdev, uid, gid):
        """A FIFO, socket or device: only its inode lives here, the kernel does its I/O."""
        check_int(mode, "mode")
        kind = stat.S_IFMT(mode)
        if kind not in SPECIAL:
            raise fail(errno.EINVAL, f"mknod makes FIFOs, sockets and devices, not mode {mode:o}")
        rdev = rdev if kind in DEVICES else 0  # checked in plan_mk
        return self._make(parent, name, kind | (mode & 0o7777), uid, gid, None, rdev)

    def symlink(self, parent, name, target, uid, gid):
        return self._make(parent, name, stat.S_IFLNK | 0o777, uid, gid, target)

    async def mkvolume(self, parent, name, mode, xattrs, max_bytes):
        """A directory (uid/gid 0) born with `xattrs` and a byte quota, in one record that is
        synced before the reply. `parent` is an inode or an absolute path, resolved here in
        the same step (a caller holding no inode number cannot hold a stale one)."""
        check_int(mode, "mode")
        if isinstance(parent, str):
            parent = self.ns.resolve(parent).ino
        ino = self._ids(1)
        mode = stat.S_IFDIR | (mode & 0o7777)
        record = self.ns.plan_mkvol(parent, name, ino, mode, self._now(), xattrs, max_bytes)
        return await self._commit_durable(record)

    async def sync_journal(self):
        """Answers once every change acknowledged before it is on the master's disk."""
        await self.journal.sync_all()

    async def create_batch(self, parent, names, mode, uid, gid):
        """Create many empty files in one record (bulk loads and tests)."""
        if not isinstance(names, list) or not names:
            raise fail(errno.EINVAL, "names must be a non-empty list")
        check_int(mode, "mode")
        first = await self._ids_waiting(len(names))
        record = self.ns.plan_batch(
            parent, names, first, stat.S_IFREG | (mode & 0o7777), uid, gid, self._now()
        )
        return self._commit(record)

    def unlink(self, parent, name):
        self._free_blocks(self._commit(self.ns.plan_rm(parent, name, False, self._now())))

    def rmdir(self, parent, name):
        self._commit(self.ns.plan_rm(parent, name, True, self._now()))

    def rename(self, parent, name, new_parent, new_name, flags=0):
        record = self.ns.plan_mv(parent, name, new_parent, new_name, flags, self._now())
        self._free_blocks(self._commit(record))

    def link(self, ino, new_parent, new_name):
        return self._commit(self.ns.plan_ln(ino, new_parent, new_name, self._now()))

    async def setattr(self, ino, mode=None, uid=None, gid=None, size=None, atime=None, mtime=None):
        if size is not None:
            await self._truncate_tail(ino, check_int(size, "size"))
        before = self.ns.get(ino).size
        record = self.ns.plan_attr(ino, mode, uid, gid, size, atime, mtime, self._now())
        freed = self._commit(record)
        attr = self.ns.get(ino).attr()
        if freed or (size is not None and size != before):
            # a worker already cut the tail block and the freed ones are about to go: the
            # new length must not be undone by a power loss, so it is synced first
            await self.journal.sync_all()
            # deleted at once, so a writer with a stale block map is refused
            await self._delete_now(freed)
        return attr

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
            self._commit(["drop", ino, keep // bs, lost])

    def setxattr(self, ino, name, value, flags=0):
        self._commit(self.ns.plan_xset(ino, name, value, flags, self._now()))

    def removexattr(self, ino, name):
        self._commit(self.ns.plan_xrm(ino, name, self._now()))

    def set_quota(self, ino, max_bytes, max_inodes):
        return self._commit(self.ns.plan_quota(ino, max_bytes, max_inodes))

    def commit(self, ino, size, mtime=None):
        return self._commit(self.ns.plan_commit(ino, size, mtime, self._now()))

    def mkdirs(self, path, mode=0o755, uid=0, gid=0):
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
                    self.mkdir(node.ino, name, mode, uid, gid)
                except OSError as exc:
                    if exc.errno != errno.EEXIST:
                        raise
            node = self.ns.child(node.ino, name)
        self.ns.dir(node.ino)
        return node.attr()

    def remove_tree(self, path):
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
        self._free_blocks(self._commit(record))
        return True

    # ------------------------------------------------------------ data placement

    def allocate(self, ino, first, count, end):
        """Blocks `first..first+count-1` of a file, allocated where missing, and the length
        the file may grow to before the client must ask again (quota headroom)."""
        node = self.ns.file(ino)
        check_int(first, "first")
        check_int(count, "count", 1, MAX_ALLOC)
        check_int(end, "end")
        if end > node.size:
            self.ns._check_growth(node, end - node.size)
        missing = [i for i in range(first, first + count) if i not in node.blocks]
        if missing:
            self._place(0)  # fail early with ENOSPC
            base = self._ids(len(missing))
            needed = sum(1 for i in missing if i * self.ns.block_size < end)
            targets = self._place(len(missing), needed)
            placed = zip(missing, targets, strict=False)
            blocks = [[index, base + k, t] for k, (index, t) in enumerate(placed)]
            if blocks:
                self._commit(["alloc", ino, blocks])
        node = self.ns.file(ino)
        room = self.ns.headroom(node)
        grant = (first + count) * self.ns.block_size
        if room is not None:
            grant = min(grant, node.size + room)
        return {"blocks": self._rows(node, first, count), "grant": max(grant, end)}

    def _place(self, count: int, required: int | None = None) -> list[list[str]]:
        """Workers for `count` new blocks: the first `required` (default all) must fit, the
        rest are placed only while there is room (allocation ahead of the writer)."""
        bs = self.ns.block_size
        required = count if required is None else required
        live = self.live_workers()
        if not any(w.free - w.planned >= bs for w in live):
            raise self._no_room()
        copies = min(self.replication, len(live))
        out = []
        for k in range(count):
            workers = [w for w in live if w.free - w.planned >= bs]
            if not workers:
                if k < required:
                    raise self._no_room()
                break
            workers.sort(key=lambda w: w.free - w.planned, reverse=True)
            chosen = workers[:copies]
            for w in chosen:
                w.planned += bs
            out.append([w.worker_id for w in chosen])
        return out

    def _no_room(self) -> OSError:
        """ENOSPC, except while workers may still be re-registering after a start: there
        "no room" only means "not ready yet" (EAGAIN, the client retries)."""
        if time.monotonic() - self.started < STARTUP_GRACE and (
            not self.joined or not self.joined.issuperset(self.ns.workers)
        ):
            return fail(errno.EAGAIN, "the master has just started: workers are registering")
        return fail(errno.ENOSPC, "no live worker has free space")

    # ------------------------------------------------------------ workers

    async def register(self, worker_id, address, capacity, free, block_ids, cluster_id=None):
        """A worker (re)joins with the blocks it holds. It names the cluster id it recorded
        (None: first registration) and is refused with ESTALE when that is another cluster's:
        this master would call all its blocks orphans. The reply carries this cluster's id
        and the unknown blocks to delete."""
        if not isinstance(worker_id, str) or not isinstance(address, str):
            raise fail(errno.EINVAL, "worker id and address must be strings")
        check_int(capacity, "capacity")
        check_int(free, "free")
        if cluster_id is not None and cluster_id != self.cluster_id:
            log.error(
                "refused a worker of another cluster",
                extra=fields(worker=worker_id, address=address, its_cluster=cluster_id),
            )
            raise fail(
                errno.ESTALE,
                f"this master belongs to cluster {self.cluster_id}, the worker to {cluster_id}",
            )
        # other ids at this address are gone (the worker's data dir was replaced, or the
        # address reused): nothing is placed on them until they register again
        replaced = {
            wid for wid, addr in self.ns.workers.items() if addr == address and wid != worker_id
        }
        for wid in replaced:
            self.live.pop(wid, None)
        if self.ns.workers.get(worker_id) != address:
            self._commit(["worker", worker_id, address])
        self.live[worker_id] = WorkerState(worker_id, address, capacity, free, time.monotonic())
        self.joined.add(worker_id)
        reported = set(block_ids)
        known, missing = [], 0
        holding = self.ns.holding
        for node in self.ns.inodes.values():
            if node.blocks:
                for block_id, workers in node.blocks.values():
                    if worker_id in workers:
                        if block_id in reported:
                            known.append(block_id)
                        elif block_id in holding:
                            missing += 1
                    elif replaced and block_id in holding and replaced.issuperset(workers):
                        missing += 1
        self._mark(known)  # blocks from before reports, or whose report was lost
        orphans = list(reported.difference(known))
        if orphans:  # a block this state does not know may belong to a change not yet on disk
            await self.journal.sync_all()
        if missing:
            log.error(
                "blocks that held data have no copy here: reading them fails with EIO",
                extra=fields(
                    worker=worker_id, address=address, lost=missing, replaced=sorted(replaced)
                ),
            )
        log.info(
            "worker registered",
            extra=fields(
                worker=worker_id, address=address, blocks=len(block_ids), orphans=len(orphans)
            ),
        )
        return {"block_size": self.ns.block_size, "delete": orphans, "cluster_id": self.cluster_id}

    def _mark(self, block_ids) -> None:
        """Record (journaled) that these blocks hold data on a worker."""
        new = [b for b in block_ids if isinstance(b, int) and b not in self.ns.holding]
        for k in range(0, len(new), MARK_RECORD):  # a first registration may bring millions
            self._commit(["data", new[k : k + MARK_RECORD]])

    def blocks_written(self, worker_id, block_ids) -> bool:
        """A worker's report of blocks it created (before it acknowledges their sync); False
        when the worker is not registered here (it reports again after registering)."""
        if worker_id not in self.live or not isinstance(block_ids, list):
            return False
        self._mark(block_ids)
        return True

    def unregister(self, worker_id):
        """A worker shutting down: place nothing more on it (its blocks stay known)."""
        if self.live.pop(worker_id, None) is not None:
            log.info("worker left", extra=fields(worker=worker_id))

    def heartbeat(self, worker_id, capacity, free, written=None):
        """`written`: blocks the worker created since its last heartbeat."""
        state = self.live.get(worker_id)
        if state is None:
            return {"known": False, "delete": []}
        if written:
            self.blocks_written(worker_id, written)
        state.capacity = opt_int(capacity, "capacity") or 0
        state.free = opt_int(free, "free") or 0
        state.planned = 0
        state.seen = time.monotonic()
        self._release_frees()
        return {"known": True, "delete": self.deletions.pop(worker_id, [])}
