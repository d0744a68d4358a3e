"""Open files: kernel file handles and the per-inode state they share.

Several handles (and processes) may have one inode open; they share one write-back
buffer, so a read through any handle sees every write made through this mount.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fusecsi.fuse.listings import Scan
from fusecsi.fuse.readahead import ReadAhead
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
    __slots__ = ("files", "dirs", "inodes", "_next")

    def __init__(self) -> None:
        self.files: dict[int, Handle] = {}
        self.dirs: dict[int, DirHandle] = {}
        self.inodes: dict[int, OpenInode] = {}
        self._next = 1

    def _fh(self) -> int:
        fh = self._next
        self._next += 1
        return fh

    def open_file(self, ino: int, size: int, writable: bool) -> tuple[int, Handle]:
        node = self.inodes.get(ino)
        if node is None:
            node = self.inodes[ino] = OpenInode(ino, size)
        elif node.writer is None or not node.writer.dirty:
            node.size = size if node.writer is None else max(size, node.writer.size)
        node.opens += 1
        node.writers += writable
        fh = self._fh()
        handle = self.files[fh] = Handle(node, writable)
        return fh, handle

    def close_file(self, fh: int) -> Handle | None:
        """Forget a handle; the caller finishes the inode when `handle.node.opens` is 0."""
        handle = self.files.pop(fh, None)
        if handle is not None:
            handle.node.opens -= 1
            handle.node.writers -= handle.writable
            if handle.node.opens == 0:
                del self.inodes[handle.node.ino]
        return handle

    def open_dir(self, ino: int) -> int:
        fh = self._fh()
        self.dirs[fh] = DirHandle(ino)
        return fh
