"""Open files: kernel file handles and the per-inode state they share.

Several handles (and processes) may have one inode open; they share one write-back
buffer, so a read through any handle sees every write made through this mount.

With a HandleStore (a daemon serving a kept connection, takeover.py) every handle is also
written to the store, with whether its inode holds acknowledged but uncommitted writes and
whether its file is an orphan (unlinked while open), and such writes are journaled
(spool.py), so a replacement daemon answers the same handles (`adopt_handles`), stores the
writes the dead one had acknowledged and removes an orphan at its last close.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field

import pyfuse3

from fusecsi.fuse.handlestore import DIR, READER, WRITER, HandleStore
from fusecsi.fuse.listings import Scan
from fusecsi.fuse.readahead import ReadAhead
from fusecsi.fuse.spool import Spool, SpoolDir
from fusecsi.fuse.writeback import WriteBuffer


@dataclass(slots=True, eq=False)
class OpenInode:
    ino: int  # cluster inode number
    size: int  # length as this mount sees it (when nothing is buffered)
    opens: int = 0
    writers: int = 0  # handles open for writing
    writer: WriteBuffer | None = None
    version: int = 0  # bumped on every local change, to drop stale read-ahead
    # Where the file was moved when it was unlinked while open: (directory, name).
    orphan: tuple[int, bytes] | None = None
    fhs: list[int] = field(default_factory=list)  # its handles, kept only with a store
    unsaved: bool = False  # the store says it holds writes not committed
    spool: Spool | None = None  # the journal of its uncommitted writes (takeover)

    @property
    def current_size(self) -> int:
        return self.writer.size if self.writer is not None else self.size


@dataclass(slots=True, eq=False)
class Handle:
    node: OpenInode
    writable: bool
    reader: ReadAhead | None = None


@dataclass(slots=True)
class DirHandle:
    ino: int  # cluster inode number
    # The last page read from the cluster, keyed by the cookie it started at, so a kernel
    # buffer that fills mid-page does not cost a second round trip.
    page_cookie: int = -1
    page: list = field(default_factory=list)
    scan: Scan | None = None  # a read from the first entry, collecting every name


class HandleTable:
    __slots__ = ("files", "dirs", "inodes", "_next", "store", "spools")

    def __init__(self, store: HandleStore | None = None, spools: SpoolDir | None = None) -> None:
        self.files: dict[int, Handle] = {}
        self.dirs: dict[int, DirHandle] = {}
        self.inodes: dict[int, OpenInode] = {}
        self._next = 1
        self.store = store
        self.spools = spools  # None: no takeover, nothing journaled

    def _fh(self, ino: int, kind: int, dirty: bool = False, orphan: bool = False) -> int:
        if self.store is not None:
            return self.store.add(ino, kind, dirty, orphan)
        fh = self._next
        self._next += 1
        return fh

    def open_file(self, ino: int, size: int, writable: bool) -> tuple[int, Handle]:
        node = self.inodes.get(ino)
        if node is None:
            node = self.inodes[ino] = OpenInode(ino, size)
        elif node.writer is None or not node.writer.dirty:
            node.size = size if node.writer is None else max(size, node.writer.size)
        fh = self._fh(ino, WRITER if writable else READER, node.unsaved, node.orphan is not None)
        return fh, self._add(fh, node, writable)

    def adopt(self, fh: int, ino: int, size: int, writable: bool) -> None:
        """A handle a dead daemon issued on this connection (from the store)."""
        node = self.inodes.get(ino)
        if node is None:
            node = self.inodes[ino] = OpenInode(ino, size)
        self._add(fh, node, writable)

    def _add(self, fh: int, node: OpenInode, writable: bool) -> Handle:
        node.opens += 1
        node.writers += writable
        if self.store is not None:
            node.fhs.append(fh)
        handle = self.files[fh] = Handle(node, writable)
        return handle

    def close_file(self, fh: int) -> Handle | None:
        """Forget a handle; the caller finishes the inode when `handle.node.opens` is 0, and
        then frees the handle's slot in the store (`free`): until then a replacement daemon
        still finishes it."""
        handle = self.files.pop(fh, None)
        if handle is not None:
            node = handle.node
            node.opens -= 1
            node.writers -= handle.writable
            if node.opens == 0:
                del self.inodes[node.ino]
                if node.spool is not None:  # (a failed commit was reported by flush)
                    node.spool.drop()
                    node.spool = None
            if self.store is not None:
                node.fhs.remove(fh)
        return handle

    def free(self, fh: int) -> None:
        """The closed handle `fh` is finished: its slot may go."""
        if self.store is not None:
            self.store.remove(fh)

    def open_dir(self, ino: int) -> int:
        fh = self._fh(ino, DIR)
        self.dirs[fh] = DirHandle(ino)
        return fh

    def close_dir(self, fh: int) -> DirHandle | None:
        handle = self.dirs.pop(fh, None)
        if handle is not None and self.store is not None:
            self.store.remove(fh)
        return handle

    def wrote(self, node: OpenInode) -> None:
        """A write to `node` is about to be acknowledged (before it is committed)."""
        if self.store is not None and not node.unsaved:
            self._mark(node, True)

    def committed(self, node: OpenInode) -> None:
        """A commit of `node` succeeded; it may have covered every write."""
        if node.unsaved and (node.writer is None or not node.writer.dirty):
            self._mark(node, False)

    def _mark(self, node: OpenInode, unsaved: bool) -> None:
        node.unsaved = unsaved
        for fh in node.fhs:
            self.store.mark(fh, unsaved)

    def spool(self, node: OpenInode) -> Spool:
        if node.spool is None:
            node.spool = self.spools.spool(node.ino)
        return node.spool

    def mark_orphan(self, node: OpenInode, orphan: bool) -> None:
        """Whether `node` is (about to be) moved to the orphans directory, in the store."""
        if self.store is not None:
            for fh in node.fhs:
                self.store.mark_orphan(fh, orphan)


async def adopt_handles(ops) -> int:
    """Answer the handles a dead daemon issued: each file handle is opened again on its
    inode, the writes it had acknowledged and not committed are replayed from its journal
    and committed (spool.py), and an orphan is known again (removed at its last close)."""
    handles = ops.handles
    records = handles.store.records()
    spools = handles.spools
    journals = spools.segments() if spools is not None else {}
    orphans: set[int] = set()
    for fh, ino, kind, dirty, orphan in records:
        if kind == DIR:
            handles.dirs[fh] = DirHandle(ino)
            continue
        node = handles.inodes.get(ino)
        size = node.size if node is not None else await _size(ops, ino)
        handles.adopt(fh, ino, size, kind == WRITER)
        node = handles.inodes[ino]
        node.unsaved |= dirty
        if orphan:
            orphans.add(ino)
        if dirty and ino not in journals and (spools is None or not spools.existed):
            # a daemon without journals: its acknowledged writes died with it
            ops.client.write_lost(ino, size, OSError(errno.EIO, "lost with a FUSE daemon"))
    for ino, seqs in journals.items():
        node = handles.inodes.get(ino)
        if node is None:  # its last handle was closed (and any loss reported): nothing to keep
            spools.remove(ino, seqs)
            continue
        node.spool = spools.spool(ino, seqs)
        await ops.replay(node)
    for ino in orphans:
        await ops.adopt_orphan(handles.inodes[ino])
    return len(records)


async def _size(ops, ino: int) -> int:
    try:
        return (await ops.call(ops.client.getattr, ino)).size
    except pyfuse3.FUSEError as exc:
        if exc.errno != errno.ENOENT:
            raise
        return 0  # removed meanwhile: the kernel still closes its handle
