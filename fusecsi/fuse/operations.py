"""pyfuse3 Operations over the cluster client: the kernel's requests, one handler each.

Inode numbers are the cluster's (fs-path shows as the root, see inodes.py). Entries and
attributes go back with the configured kernel cache timeouts, so repeated stats and path
walks never reach the daemon. Writes are buffered per open inode (writeback.py) and made
visible to other mounts by `commit` at flush/fsync/close: close-to-open consistency.
At open the daemon asks the cluster for the file's current length and mtime; when they
are unchanged since this mount last saw them the kernel keeps its page cache, otherwise
the kernel's cached attributes are invalidated so the new length is seen.

A file unlinked (or renamed over) while open through this mount is moved into a hidden
directory at the top of fs-path and removed at its last close, so it stays readable.

With takeover (a kept connection) every acknowledged write is also journaled outside the
daemon until a commit covers it (spool.py), and a replacement daemon replays it.

A missing name is answered with a negative entry, which the kernel caches for
`entry-timeout` seconds like a positive one. In a directory whose every name this mount
knows (listings.py: made or read through this mount, read again while in use) a lookup is
answered without a cluster call, within the same cache bounds.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import stat
import time
from functools import partial

import pyfuse3
import trio
from pyfuse3 import EntryAttributes, FileInfo, FUSEError

from fusecsi.fuse import spool as spooling
from fusecsi.fuse import xattrs
from fusecsi.fuse.calls import ClusterCalls
from fusecsi.fuse.dircache import DirAttrs
from fusecsi.fuse.handles import HandleTable, OpenInode
from fusecsi.fuse.inodes import ROOT_INODE, InodeMap, LookupCounts
from fusecsi.fuse.listings import Listings
from fusecsi.fuse.readahead import ReadAhead
from fusecsi.fuse.statfs_inode import StatfsInode
from fusecsi.fuse.stats import OpStats
from fusecsi.fuse.writeback import WriteBuffer
from fusecsi.logs import fields

log = logging.getLogger(__name__)

MAX_NAME = 255
ORPHANS = b".fusecsi-orphans"  # in fs-path's top directory, hidden from the mount
READDIR_PAGE = 1000
# A sequential reader is served from windows of up to 4 MiB read straight into memory the
# short-circuit client keeps for them (fusecsi/cluster/readmemory.py), at least 12 MiB ahead.
# Against 1 MiB windows 4 MiB ahead: a third less daemon CPU per GiB, 1 GiB read through
# FUSE ~1.3x as fast on the 2-core VM, peak RSS no higher (docs/design.md).
READ_WINDOW = 4 << 20
MIN_READ_AHEAD = 12 << 20
# The client keeps up to 8 written pieces in flight and a read-ahead window is held while
# the kernel consumes it. With short-circuit writes going straight to disk, 1 MiB pieces
# write as fast as 2 MiB ones within this VM's noise (350-500 MB/s both) and keep the
# daemon's peak memory over the whole fuse_io benchmark at ~63 MiB instead of ~80.
MAX_PIECE = 1 << 20
# A small random read brings the aligned 128 KiB around it (the kernel's default read-ahead)
# into the page cache: one round trip then serves later reads nearby. It pays off for reads
# from this host's block files too: a miss reads a whole 64 KiB checksum chunk from the disk
# anyway (measured: 4 KiB random reads ~3,000/s without it, 4,400+/s with it).
READ_AROUND = 128 << 10
# Pages waiting to be pushed into the kernel: past this many bytes a read-around is dropped
# (the kernel asks again if it needs them) instead of queueing; a burst of random reads
# otherwise parked ~13 MiB of pieces here and raised the daemon's peak memory by as much.
STORE_BACKLOG = 1 << 20
PAGE = 4096
BLKSIZE = 1 << 20  # tools size their I/O by st_blksize: ask for large requests


class Operations(pyfuse3.Operations):
    supports_dot_lookup = False

    def __init__(self, client, base_ino: int, options) -> None:
        super().__init__()
        self.enable_writeback_cache = bool(options["writeback-cache"])
        self.client = client
        self.call = ClusterCalls(float(options["io-timeout"]))
        self.inodes = InodeMap(base_ino)
        self.base = base_ino
        self.lookups = LookupCounts()
        self.dirs: set[int] = {base_ino}  # directories the kernel knows (for listxattr)
        self.handles = HandleTable()
        self.read_only = bool(options["read-only"])
        self.attr_timeout = float(options["attr-timeout"])
        self.entry_timeout = float(options["entry-timeout"])
        self.dir_attrs = DirAttrs(self.attr_timeout)
        self.listings = Listings(self.entry_timeout, self.attr_timeout)
        self.write_buffer = int(options["write-buffer-mb"]) << 20
        self.read_ahead = int(options["read-ahead-kb"]) << 10
        self.set_block_size(4 << 20)
        self.spawn = None  # nursery.start_soon of the daemon, set before serving
        self._seen: dict[int, tuple[int, int]] = {}  # ino -> (size, mtime) at last open/commit
        self._orphan_dir: int | None = None
        self._store_limiter = trio.CapacityLimiter(1)
        self._store_backlog = 0  # bytes of read-around pieces not yet in the kernel
        self._direct: set[int] = set()  # handles opened O_DIRECT: the page cache is not read
        self.stats = OpStats()
        self.statfs_inode = StatfsInode()
        self.idle = lambda: None  # called when no file with data I/O is open any more

    def set_block_size(self, block_size: int) -> None:
        """Size write pieces and read-ahead windows so each stays inside one cluster block."""
        piece = min(block_size, MAX_PIECE)
        self.write_limit = min(self.write_buffer, piece)
        self.read_window = window = min(block_size, READ_WINDOW)
        self.read_depth = -(-max(MIN_READ_AHEAD, self.read_ahead) // window)

    # -- helpers

    def _entry(self, attr) -> EntryAttributes:
        entry = EntryAttributes()
        ino = attr.ino
        entry.st_ino = ROOT_INODE if ino == self.base else ino
        entry.entry_timeout = self.entry_timeout
        entry.attr_timeout = self.attr_timeout
        entry.st_mode = attr.mode
        entry.st_nlink = attr.nlink
        entry.st_rdev = attr.rdev
        entry.st_uid = attr.uid
        entry.st_gid = attr.gid
        size = attr.size
        node = self.handles.inodes.get(ino)
        if node is not None and node.orphan is not None:
            # unlinked while open: only the hidden name keeps it, which is none of the user's
            entry.st_nlink = max(0, attr.nlink - 1)
        if node is not None and node.writer is not None:
            # Never less than this mount wrote: `attr` may predate a commit still on its way
            # (or just done), and a smaller size would let the kernel's i_size go backwards
            # (an O_APPEND write would then land on earlier data).
            size = max(size, node.writer.size)
        entry.st_size = size
        entry.st_blksize = BLKSIZE
        entry.st_blocks = (size + 511) // 512
        entry.st_atime_ns = attr.atime_ns
        entry.st_mtime_ns = attr.mtime_ns
        entry.st_ctime_ns = attr.ctime_ns
        return entry

    @staticmethod
    def _negative(timeout: float) -> EntryAttributes:
        """A reply meaning "no such name", cached by the kernel for `timeout` seconds."""
        entry = EntryAttributes()
        entry.st_ino = 0
        entry.entry_timeout = timeout
        return entry

    async def _change(self, dirs: tuple, fn, *args):
        """A namespace change in directories `dirs`; when it fails its outcome is not
        known for sure, so what this mount knew of their names is dropped."""
        try:
            return await self.call(fn, *args, idempotent=False)
        except BaseException:
            for ino in dirs:
                self.listings.forget(ino)
            raise

    async def _touch(self, ino: int, fn, *args, **kwargs):
        """A call that changes file `ino`'s attributes: what the listings kept goes."""
        try:
            return await self.call(fn, *args, **kwargs)
        finally:
            self.listings.touched(ino)

    def _count(self, attr) -> None:
        """An entry handed to the kernel: one more reference."""
        self.lookups.add(attr.ino)
        if stat.S_ISDIR(attr.mode):
            self.dirs.add(attr.ino)
            self.dir_attrs.put(attr)

    def _learn(self, attr) -> EntryAttributes:
        self._count(attr)
        return self._entry(attr)

    def _writable(self) -> None:
        if self.read_only:
            raise FUSEError(errno.EROFS)

    def _hidden(self, parent: int, name: bytes) -> bool:
        return parent == self.base and name == ORPHANS

    async def _lookup_or_none(self, parent: int, name: bytes):
        try:
            return await self.call(self.client.lookup, parent, name)
        except FUSEError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise

    def _open_here(self, attr) -> bool:
        """True when an unlink of this entry would pull a file out from under an open handle."""
        return (
            attr is not None
            and attr.ino in self.handles.inodes
            and not stat.S_ISDIR(attr.mode)
            and attr.nlink <= 1
        )

    async def _orphans(self) -> int:
        if self._orphan_dir is None:
            attr = await self._lookup_or_none(self.base, ORPHANS)
            if attr is None:
                try:
                    attr = await self._change(
                        (self.base,), self.client.mkdir, self.base, ORPHANS, 0o700, 0, 0
                    )
                    self.listings.added(self.base, ORPHANS)
                except FUSEError as exc:
                    if exc.errno != errno.EEXIST:
                        raise
                    attr = await self.call(self.client.lookup, self.base, ORPHANS)
            self._orphan_dir = attr.ino
        return self._orphan_dir

    async def _orphan(self, parent: int, name: bytes, ino: int) -> None:
        where = await self._orphans()
        hidden = b"%d" % ino
        node = self.handles.inodes.get(ino)
        if node is not None:
            # in the store before the rename: a replacement daemon that finds the flag checks
            # whether the hidden name exists (the rename may not have happened)
            self.handles.mark_orphan(node, True)
        try:
            await self._change((parent, where), self.client.rename, parent, name, where, hidden, 0)
        except BaseException:
            if node is not None and node.orphan is None:
                self.handles.mark_orphan(node, False)
            raise
        self.dir_attrs.changed(parent)
        self.listings.removed(parent, name)
        self.listings.added(where, hidden)
        node = self.handles.inodes.get(ino)
        if node is not None:
            node.orphan = (where, hidden)
            self.handles.mark_orphan(node, True)  # (handles opened during the rename)
        else:  # closed while we were renaming
            await self._unlink_orphan(where, hidden)

    async def adopt_orphan(self, node: OpenInode) -> None:
        """A dead daemon marked `node` an orphan (takeover): it is one if its hidden name
        exists (the daemon may have died before the rename, or after the last close's
        unlink)."""
        found = await self._lookup_or_none(self.base, ORPHANS)
        hidden = b"%d" % node.ino
        attr = None if found is None else await self._lookup_or_none(found.ino, hidden)
        if attr is not None and attr.ino == node.ino:
            self._orphan_dir = found.ino
            node.orphan = (found.ino, hidden)
        else:
            self.handles.mark_orphan(node, False)

    async def _unlink_orphan(self, where: int, hidden: bytes) -> None:
        await self._change((where,), self.client.unlink, where, hidden)
        self.listings.removed(where, hidden)

    async def _fetch(self, ino: int, offset: int, size: int) -> bytes:
        # a small read from this host's block files needs no deadline: it cannot wait
        data = self.client.read_now(ino, offset, size)
        if data is not None:
            return data
        return await self.call(self.client.read, ino, offset, size)

    async def _send(self, ino: int, offset: int, data: bytes) -> None:
        try:
            await self.call(self.client.write, ino, offset, data)
        except BaseException as exc:  # these bytes were acknowledged by write() calls
            if isinstance(exc, FUSEError):
                exc = OSError(exc.errno, "write failed")
            self.client.write_lost(ino, offset, exc)
            raise

    async def _commit(self, node: OpenInode, durable: bool = False) -> None:
        """Everything written through this mount reaches the workers and its length the master
        (`durable`: their disks, for fsync)."""
        writer = node.writer
        async with writer.sizing:
            await writer.drain()
            spool = node.spool
            if not writer.dirty:
                if spool is not None and spool.total:  # journaled after a commit covered them
                    spool.covered(spool.mark())
                if durable:
                    await self.call(self.client.sync, node.ino)
                return
            written = writer.written  # later writes stay dirty: this commit may not cover them
            mark = spool.mark() if spool is not None else None  # (no await since `written`)
            attr = await self._touch(
                node.ino, self.client.commit, node.ino, writer.size, time.time_ns(), durable=durable
            )
            writer.committed = max(writer.committed, written)
            if spool is not None:
                spool.covered(mark)  # before the store says clean: never clean with no journal
            self.handles.committed(node)
        node.size = attr.size
        self._seen[node.ino] = (attr.size, attr.mtime_ns)

    async def _invalidate_attrs(self, ino: int) -> None:
        kernel_ino = self.inodes.to_kernel(ino)
        try:
            if self.enable_writeback_cache:  # may block on dirty pages: not on the loop
                await trio.to_thread.run_sync(pyfuse3.invalidate_inode, kernel_ino, True)
            else:
                pyfuse3.invalidate_inode(kernel_ino, True)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # ENOENT: the kernel holds nothing for it
                log.warning("attribute invalidation failed", extra=fields(ino=ino, err=str(exc)))

    async def drain_all(self) -> None:
        """Commit every open file's buffered writes (at shutdown)."""
        for node in list(self.handles.inodes.values()):
            if node.writer is not None:
                try:
                    await self._commit(node)
                except FUSEError as exc:
                    log.error("unwritten data lost", extra=fields(ino=node.ino, errno=exc.errno))

    # -- names

    async def lookup(self, parent_inode, name, ctx):
        if len(name) > MAX_NAME:  # before the listings: they would call it absent
            raise FUSEError(errno.ENAMETOOLONG)
        parent = self.inodes.to_cluster(parent_inode)
        if self._hidden(parent, name):
            return self._negative(self.entry_timeout)
        known = self.listings.known(parent, name)
        if known is not None:
            if self.listings.due(parent) and self.spawn is not None:
                self.spawn(self._refresh, parent)
            attr, entry_left, attr_left = known
            if attr is None:
                return self._negative(entry_left)
            entry = self._learn(attr)
            entry.entry_timeout = entry_left
            entry.attr_timeout = attr_left
            return entry
        attr = await self._lookup_or_none(parent, name)
        if attr is None:
            return self._negative(self.entry_timeout)
        return self._learn(attr)

    async def forget(self, inode_list):
        for kernel_ino, count in inode_list:
            ino = self.inodes.to_cluster(kernel_ino)
            if self.lookups.forget(ino, count):
                self.dirs.discard(ino)
                self.dir_attrs.drop(ino)
                if ino not in self.handles.inodes:
                    self._seen.pop(ino, None)

    async def getattr(self, inode, ctx):
        ino = self.inodes.to_cluster(inode)
        attr = self.dir_attrs.get(ino)
        if attr is None:
            attr = await self.call(self.client.getattr, ino)
            if stat.S_ISDIR(attr.mode):
                self.dir_attrs.put(attr)
        return self._entry(attr)

    async def setattr(self, inode, attr, fields_, fh, ctx):
        self._writable()
        ino = self.inodes.to_cluster(inode)
        changes = {}
        node = self.handles.inodes.get(ino)
        writer = node.writer if node is not None and fields_.update_size else None
        if fields_.update_size:
            changes["size"] = attr.st_size
        if fields_.update_mode:
            changes["mode"] = stat.S_IMODE(attr.st_mode)
        if fields_.update_uid:
            changes["uid"] = attr.st_uid
        if fields_.update_gid:
            changes["gid"] = attr.st_gid
        if fields_.update_atime:
            changes["atime_ns"] = attr.st_atime_ns
        if fields_.update_mtime:
            changes["mtime_ns"] = attr.st_mtime_ns
        async with writer.sizing if writer is not None else contextlib.nullcontext():
            if writer is not None:
                await writer.drain()
            # a size change publishes the writes before it (ClusterClient.setattr)
            mark = node.spool.mark() if writer is not None and node.spool is not None else None
            new = await self._touch(ino, self.client.setattr, ino, **changes)
            if writer is not None:
                writer.truncated(new.size)
            if mark is not None:
                node.spool.covered(mark)
        if stat.S_ISDIR(new.mode):
            self.dir_attrs.put(new)
        if fields_.update_size and node is not None:
            node.size = new.size
            node.version += 1
        return self._entry(new)

    async def readlink(self, inode, ctx):
        return await self.call(self.client.readlink, self.inodes.to_cluster(inode))

    async def _make(self, fn, parent_inode, name, *args, subdirs: int = 0):
        """Create a name (file, directory, symlink) for the caller; the new entry's Attr."""
        self._writable()
        parent = self.inodes.to_cluster(parent_inode)
        if self._hidden(parent, name):
            raise FUSEError(errno.EEXIST)
        attr = await self._change((parent,), fn, parent, name, *args)
        self.dir_attrs.changed(parent, subdirs)
        self.listings.added(parent, name)
        return attr

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        if stat.S_ISREG(mode):
            attr = await self._make(
                self.client.create, parent_inode, name, stat.S_IMODE(mode), ctx.uid, ctx.gid
            )
        else:  # FIFOs, sockets, devices: the cluster keeps the inode, the kernel its I/O
            attr = await self._make(
                self.client.mknod, parent_inode, name, mode, rdev, ctx.uid, ctx.gid
            )
        return self._learn(attr)

    async def mkdir(self, parent_inode, name, mode, ctx):
        mode = stat.S_IMODE(mode)
        before = time.monotonic()
        attr = await self._make(
            self.client.mkdir, parent_inode, name, mode, ctx.uid, ctx.gid, subdirs=1
        )
        self.listings.establish(attr.ino, {}, before)  # a new directory is empty
        return self._learn(attr)

    async def unlink(self, parent_inode, name, ctx):
        self._writable()
        parent = self.inodes.to_cluster(parent_inode)
        if self._hidden(parent, name):
            raise FUSEError(errno.ENOENT)
        if self.handles.inodes:  # only then can the name belong to an open file
            attr = await self._lookup_or_none(parent, name)
            if self._open_here(attr):
                await self._orphan(parent, name, attr.ino)
                return
        await self._change((parent,), self.client.unlink, parent, name)
        self.dir_attrs.changed(parent)
        self.listings.removed(parent, name)

    async def rmdir(self, parent_inode, name, ctx):
        self._writable()
        parent = self.inodes.to_cluster(parent_inode)
        if self._hidden(parent, name):
            raise FUSEError(errno.ENOENT)
        await self._change((parent,), self.client.rmdir, parent, name)
        self.dir_attrs.changed(parent, -1)
        self.listings.removed(parent, name)

    async def symlink(self, parent_inode, name, target, ctx):
        return self._learn(
            await self._make(self.client.symlink, parent_inode, name, target, ctx.uid, ctx.gid)
        )

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        self._writable()
        old = self.inodes.to_cluster(parent_inode_old)
        new = self.inodes.to_cluster(parent_inode_new)
        self.dir_attrs.drop(old)  # link counts may move between the two: ask again
        self.dir_attrs.drop(new)
        if self._hidden(old, name_old) or self._hidden(new, name_new):
            raise FUSEError(errno.EPERM)
        if self.handles.inodes and not flags & pyfuse3.RENAME_EXCHANGE:
            target = await self._lookup_or_none(new, name_new)
            if self._open_here(target):
                if flags & pyfuse3.RENAME_NOREPLACE:
                    raise FUSEError(errno.EEXIST)
                # Swap atomically, then move the replaced file (now under the old name) aside.
                exchange = pyfuse3.RENAME_EXCHANGE
                await self._change(
                    (old, new), self.client.rename, old, name_old, new, name_new, exchange
                )
                self._renamed(old, name_old, new, name_new, exchange)
                await self._orphan(old, name_old, target.ino)
                return
        await self._change((old, new), self.client.rename, old, name_old, new, name_new, flags)
        self._renamed(old, name_old, new, name_new, flags)

    def _renamed(self, old: int, name_old: bytes, new: int, name_new: bytes, flags: int) -> None:
        """Follow a rename in the listings."""
        if flags & pyfuse3.RENAME_EXCHANGE:  # both names stay, each on the other's file
            self.listings.added(old, name_old)
        else:
            self.listings.removed(old, name_old)
        self.listings.added(new, name_new)  # (kept attributes of a replaced file dropped)

    async def link(self, inode, new_parent_inode, new_name, ctx):
        self._writable()
        parent = self.inodes.to_cluster(new_parent_inode)
        if self._hidden(parent, new_name):
            raise FUSEError(errno.EEXIST)
        ino = self.inodes.to_cluster(inode)
        try:
            attr = await self._change((parent,), self.client.link, ino, parent, new_name)
        finally:
            self.listings.touched(ino)  # its link count changed
        self.dir_attrs.changed(parent)
        self.listings.added(parent, new_name)
        return self._learn(attr)

    # -- files

    async def open(self, inode, flags, ctx):
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        if writable:
            self._writable()
        ino = self.inodes.to_cluster(inode)
        self.client.forget_layout(ino)  # close-to-open: reads ask for the current block map
        if writable and flags & os.O_TRUNC:  # libfuse asks for atomic O_TRUNC: it comes here
            node = self.handles.inodes.get(ino)
            mark = None
            if node is not None and node.writer is not None:
                await node.writer.drain()
                node.writer.truncated(0)
                node.version += 1
                mark = node.spool.mark() if node.spool is not None else None
            attr = await self._touch(ino, self.client.setattr, ino, size=0)
            if mark is not None and node.spool is not None:
                node.spool.covered(mark)
        else:
            attr = await self.call(self.client.getattr, ino)  # close-to-open: current length
        seen = (attr.size, attr.mtime_ns)
        keep = self._seen.get(ino) == seen
        if not keep:
            self._seen[ino] = seen
            await self._invalidate_attrs(ino)
        fh, _ = self.handles.open_file(ino, attr.size, writable)
        if flags & os.O_DIRECT:
            self._direct.add(fh)
        return FileInfo(fh=fh, keep_cache=keep)

    async def create(self, parent_inode, name, mode, flags, ctx):
        mode = stat.S_IMODE(mode)
        try:
            attr = await self._make(self.client.create, parent_inode, name, mode, ctx.uid, ctx.gid)
        except FUSEError as exc:
            parent = self.inodes.to_cluster(parent_inode)
            if exc.errno != errno.EEXIST or flags & os.O_EXCL or self._hidden(parent, name):
                raise
            # created meanwhile by another mount: plain O_CREAT opens it
            attr = await self.call(self.client.lookup, parent, name)
            if stat.S_ISDIR(attr.mode):
                raise FUSEError(errno.EISDIR) from None
        entry = self._learn(attr)
        self._seen[attr.ino] = (attr.size, attr.mtime_ns)
        fh, _ = self.handles.open_file(attr.ino, attr.size, True)
        return FileInfo(fh=fh, keep_cache=True), entry

    async def read(self, fh, off, size):
        handle = self.handles.files[fh]
        node = handle.node
        if node.writer is not None and node.writer.dirty:
            await self._commit(node)  # the cluster serves reads up to the committed length
        reader = handle.reader
        if reader is None:
            reader = handle.reader = ReadAhead(
                partial(self._fetch, node.ino),
                self.read_window,
                self.read_depth,
                self.spawn,
                READ_AROUND,
                partial(self._store_around, node),
            )
        # pages pushed into the kernel must not race a write made through this mount
        around = node.writers == 0 and node.writer is None and fh not in self._direct
        data = await reader.read(off, size, node.version, node.current_size, around)
        self.stats.read_bytes.add(amount=len(data))
        return data

    def _store_around(self, node: OpenInode, start: int, data: bytes, lo: int, hi: int) -> None:
        """Put `data` (read at `start`) into the kernel's page cache, except the pages of
        [lo, hi): the kernel holds those locked until this read is answered."""
        skip_from = lo - lo % PAGE - start
        skip_to = min(len(data), -(-(hi - start) // PAGE) * PAGE)
        pieces = [(start, data[:skip_from]), (start + skip_to, data[skip_to:])]
        pieces = [(off, piece) for off, piece in pieces if piece]
        size = sum(len(piece) for _, piece in pieces)
        if pieces and self._store_backlog + size <= STORE_BACKLOG:
            self._store_backlog += size
            self.spawn(self._notify_store, node, node.version, pieces, size)

    async def _notify_store(self, node: OpenInode, version: int, pieces, size: int) -> None:
        kernel_ino = self.inodes.to_kernel(node.ino)
        try:
            for offset, piece in pieces:
                if node.version != version or node.writers:
                    return  # changed meanwhile: never publish stale pages
                try:  # in a thread: it waits for page locks held by reads in flight
                    await trio.to_thread.run_sync(
                        pyfuse3.notify_store, kernel_ino, offset, piece, limiter=self._store_limiter
                    )
                except OSError:
                    return  # the kernel dropped the inode: nothing to fill
        finally:
            self._store_backlog -= size

    async def write(self, fh, off, buf):
        node = self.handles.files[fh].node
        ino = node.ino
        lost = self.client.write_error(ino)
        if lost is not None:  # acknowledged data of this open file was not stored
            raise FUSEError(lost.errno)
        size = len(buf)
        if not self.client.reserved(ino, off, size):
            # refused here (EDQUOT, ENOSPC) the write changes nothing; at a quota only the
            # bytes that fit are taken (a short write)
            size = await self.call(self.client.reserve, ino, off, size)
            buf = buf[:size]
        writer = node.writer
        if writer is None:
            writer = node.writer = WriteBuffer(
                partial(self._send, ino), self.write_limit, node.size
            )
        node.version += 1
        await writer.write(off, buf)
        if self.handles.spools is not None:
            await self._journal(node, off, buf)
        self.handles.wrote(node)  # kept for a replacement daemon (takeover)
        self.stats.written_bytes.add(amount=size)
        return size

    async def _journal(self, node: OpenInode, off: int, buf: bytes) -> None:
        """Keep an acknowledged write outside the daemon until a commit covers it (before
        write() is answered, spool.py); when it cannot be kept, commit it now."""
        spool = self.handles.spool(node)
        if spool.append(off, buf):
            if spool.total > spooling.LIMIT:  # a writer that never fsyncs: commit early
                try:
                    await self._commit(node)
                except FUSEError as exc:  # this write is kept; a loss is reported by the next
                    log.warning("early commit failed", extra=fields(ino=node.ino, errno=exc.errno))
            return
        log.warning("write journal failed: committing", extra=fields(ino=node.ino))
        try:
            await self._commit(node)
        except BaseException as exc:  # neither kept nor stored: reported until closed
            self.client.write_lost(node.ino, off, exc)
            raise

    async def replay(self, node: OpenInode) -> None:
        """Store and commit the writes a dead daemon had acknowledged for `node` (from its
        journal: takeover), through the same write path; not journaled again, so a daemon
        that dies meanwhile leaves the same journal to the next one. A write that cannot be
        stored is kept as a loss (EIO at the file's next write, fsync or close); a commit
        that fails leaves the journal and the file dirty for its next commit."""
        ino = node.ino
        writer = node.writer
        if writer is None:
            writer = node.writer = WriteBuffer(
                partial(self._send, ino), self.write_limit, node.size
            )
        count = 0
        try:
            for off, data in node.spool.old_records():
                if self.client.write_error(ino) is not None:
                    break
                node.version += 1
                await writer.write(off, data)
                count += 1
            await self._commit(node)
            if not writer.dirty:  # (also journals that held no complete record)
                node.spool.covered(node.spool.mark())
        except FUSEError as exc:
            log.error("replay failed", extra=fields(ino=ino, errno=exc.errno, writes=count))
            return
        log.info("writes replayed", extra=fields(ino=ino, writes=count))

    async def flush(self, fh):
        handle = self.handles.files.get(fh)
        if handle is not None and handle.node.writer is not None:
            await self._commit(handle.node)

    async def fsync(self, fh, datasync):
        handle = self.handles.files.get(fh)
        if handle is None:
            return
        if handle.node.writer is not None:
            await self._commit(handle.node, durable=True)
        else:  # data written and closed earlier through another handle
            await self.call(self.client.sync, handle.node.ino)

    async def release(self, fh):
        handle = self.handles.files.get(fh)
        if handle is None:
            return
        node = handle.node
        try:
            try:
                if node.opens == 1 and node.writer is not None:
                    await self._commit(node)
            except FUSEError as exc:
                log.error("write lost at close", extra=fields(ino=node.ino, errno=exc.errno))
            finally:
                self.handles.close_file(fh)
                self._direct.discard(fh)
                if node.opens == 0:  # nobody left to tell of a loss: the master's length stands
                    self.client.forget_writes(node.ino)
            if not self.handles.files and (handle.reader is not None or node.writer is not None):
                self.idle()  # the last file that moved data closed
            if node.opens == 0 and node.orphan is not None:
                await self._unlink_orphan(*node.orphan)
        finally:
            # only now: a daemon that dies before finishes this close in the next (takeover)
            self.handles.free(fh)

    # -- directories

    async def opendir(self, inode, ctx):
        return self.handles.open_dir(self.inodes.to_cluster(inode))

    async def readdir(self, fh, start_id, token):
        handle = self.handles.dirs[fh]
        ino = handle.ino
        cookie = start_id
        while True:
            page, start = await self._dir_page(handle, cookie)
            for name, attr, next_cookie in page[start:]:
                if not (ino == self.base and name == ORPHANS):
                    if not pyfuse3.readdir_reply(token, name, self._entry(attr), next_cookie):
                        return
                    self._count(attr)  # readdirplus: each entry counts as a lookup
                cookie = next_cookie
            if len(page) < READDIR_PAGE:
                return

    async def _dir_page(self, handle, cookie: int) -> tuple[list, int]:
        """The cluster page holding the entries after `cookie`, and where they start in it."""
        page = handle.page
        if handle.page_cookie == cookie:
            return page, 0
        for index, item in enumerate(page):
            if item[2] == cookie:
                if index + 1 < len(page) or len(page) < READDIR_PAGE:
                    return page, index + 1
                break
        if cookie == 0:  # a read from the start may show every name (listings.py)
            if handle.scan is not None:
                self.listings.end(handle.scan)
            handle.scan = self.listings.begin(handle.ino)
        page = await self.call(self.client.readdir, handle.ino, cookie, READDIR_PAGE)
        handle.page_cookie, handle.page = cookie, page
        if handle.scan is not None and not self._scanned(handle.scan, cookie, page):
            handle.scan = None
        return page, 0

    def _scanned(self, scan, cookie: int, page: list) -> bool:
        """Hand a page to a scan; False once the scan is over."""
        last = None if len(page) < READDIR_PAGE else page[-1][2]
        return self.listings.page(scan, cookie, page, last)

    async def _refresh(self, ino: int) -> None:
        """Read directory `ino` once more, so its listing stays trusted (listings.py)."""
        scan = self.listings.begin(ino)
        cookie = 0
        try:
            while True:
                page = await self.call(self.client.readdir, ino, cookie, READDIR_PAGE)
                if not self._scanned(scan, cookie, page):
                    return
                cookie = page[-1][2]
        except Exception as exc:  # the listing just expires; lookups ask the cluster
            log.info("directory re-read failed", extra=fields(ino=ino, err=repr(exc)))
        finally:
            self.listings.end(scan)

    async def releasedir(self, fh):
        handle = self.handles.close_dir(fh)
        if handle is not None and handle.scan is not None:
            self.listings.end(handle.scan)

    async def fsyncdir(self, fh, datasync):
        # namespace changes are acknowledged once journaled; this waits for the disk
        await self.call(self.client.sync_journal)

    def init(self) -> None:
        self.statfs_inode.install()  # the session exists now (FUSE_INIT)

    async def statfs(self, ctx):
        kernel_ino = self.statfs_inode.take()  # first, before any await (statfs_inode.py)
        self.statfs_inode.install()  # (no-op after the first call)
        ino = self.base if kernel_ino is None else self.inodes.to_cluster(kernel_ino)
        info = await self.call(self.client.statfs, ino)  # a volume's quota, as df shows it
        out = pyfuse3.StatvfsData()
        out.f_bsize = int(info.get("block_size") or PAGE)  # the I/O size worth asking for
        out.f_frsize = PAGE  # the unit of the counts: a 10 MiB quota is not 0 blocks of 16 MiB
        out.f_blocks = int(info["total_bytes"]) // PAGE
        out.f_bfree = int(info["free_bytes"]) // PAGE
        out.f_bavail = out.f_bfree
        out.f_files = int(info["total_inodes"])
        out.f_ffree = int(info["free_inodes"])
        out.f_favail = out.f_ffree
        out.f_namemax = MAX_NAME
        return out

    # -- extended attributes

    async def getxattr(self, inode, name, ctx):
        if name == xattrs.CAPABILITY:
            raise FUSEError(xattrs.ENOATTR)  # asked before every write: answer without a call
        xattrs.check_readable(name)
        ino = self.inodes.to_cluster(inode)
        if name == xattrs.QUOTA:
            return xattrs.quota_json(await self.call(self.client.get_quota, ino))
        return await self.call(self.client.getxattr, ino, name)

    async def setxattr(self, inode, name, value, ctx):
        xattrs.check_writable(name)
        self._writable()
        ino = self.inodes.to_cluster(inode)
        await self._touch(ino, self.client.setxattr, ino, name, value)

    async def listxattr(self, inode, ctx):
        ino = self.inodes.to_cluster(inode)
        names = xattrs.visible(await self.call(self.client.listxattr, ino))
        if ino in self.dirs:  # a directory: show the virtual quota when one applies
            try:
                await self.call(self.client.get_quota, ino)
                names.append(xattrs.QUOTA)
            except FUSEError as exc:
                if exc.errno != errno.ENODATA:
                    raise
        return names

    async def removexattr(self, inode, name, ctx):
        xattrs.check_writable(name)
        self._writable()
        ino = self.inodes.to_cluster(inode)
        await self._touch(ino, self.client.removexattr, ino, name)

    async def access(self, inode, mode, ctx):
        return True  # permission bits are the kernel's job (default_permissions)


def _guard(handler):
    """A bug or an unexpected cluster reply fails the one request with EIO, never the daemon.
    Every request is counted by operation and result (plain ints, see stats.py)."""
    op = handler.__name__
    ok, absent = (op, "OK"), (op, "ENOENT")
    negative = op == "lookup"  # a negative entry is the lookup's ENOENT

    @functools.wraps(handler)
    async def guarded(self, *args):
        stats = self.stats
        stats.in_flight += 1
        result = ok
        try:
            reply = await handler(self, *args)
            if negative and not reply.st_ino:
                result = absent
            return reply
        except FUSEError as exc:
            result = (op, errno.errorcode.get(exc.errno, "EIO"))
            raise
        except Exception:
            result = (op, "EIO")
            log.exception("request failed", extra=fields(op=op))
            raise FUSEError(errno.EIO) from None
        finally:
            stats.in_flight -= 1
            counts = stats.ops.counts
            counts[result] = counts.get(result, 0) + 1

    return guarded


def _guard_forget(handler):
    @functools.wraps(handler)
    async def guarded(self, inode_list):
        try:
            await handler(self, inode_list)
        except Exception:
            log.exception("forget failed")

    return guarded


for _name in (
    "lookup getattr setattr readlink mknod mkdir unlink rmdir symlink rename link open create "
    "read write flush fsync release opendir readdir releasedir fsyncdir statfs getxattr "
    "setxattr listxattr removexattr access"
).split():
    setattr(Operations, _name, _guard(getattr(Operations, _name)))
Operations.forget = _guard_forget(Operations.forget)
