"""The open handles of a FUSE connection, kept in a file so a replacement daemon knows them.

The kernel goes on using the file and directory handles a dead daemon issued. Each handle
is one 16-byte slot of a shared memory-mapped file (fh = slot + 1): its inode, its kind,
whether its inode holds writes acknowledged to write() but not yet committed, and whether
its file was unlinked while open (moved to the orphans directory, operations.py). A store to
the mapping is a memory write (no syscall) and survives the death of the process; the file
lives as long as the connection (mountd's connection directory), not across reboots.
"""

from __future__ import annotations

import mmap
import os
import struct

FREE, READER, WRITER, DIR = 0, 1, 2, 3
SLOT = struct.Struct("<QBBB5x")  # ino, kind, dirty, orphan (was padding: 0)
FIRST_SLOTS = 4096


class HandleStore:
    __slots__ = ("_file", "_map", "_slots", "_free", "_top")

    def __init__(self, path: str) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._file = os.fdopen(fd, "r+b")
        size = os.fstat(fd).st_size
        if size < FIRST_SLOTS * SLOT.size:
            size = FIRST_SLOTS * SLOT.size
            os.ftruncate(fd, size)
        self._map = mmap.mmap(fd, size)
        self._slots = size // SLOT.size
        used = [i for i in range(self._slots) if self._map[i * SLOT.size + 8] != FREE]
        self._top = used[-1] + 1 if used else 0  # slots from here on were never used
        taken = set(used)
        self._free = [i for i in range(self._top - 1, -1, -1) if i not in taken]

    def records(self) -> list[tuple[int, int, int, bool, bool]]:
        """(fh, ino, kind, dirty, orphan) of every handle the kernel may still use."""
        out = []
        for i in range(self._top):
            ino, kind, dirty, orphan = SLOT.unpack_from(self._map, i * SLOT.size)
            if kind != FREE:
                out.append((i + 1, ino, kind, bool(dirty), bool(orphan)))
        return out

    def add(self, ino: int, kind: int, dirty: bool = False, orphan: bool = False) -> int:
        """A new handle's slot, written; its fh."""
        if self._free:
            slot = self._free.pop()
        else:
            if self._top == self._slots:
                self._slots *= 2
                self._map.resize(self._slots * SLOT.size)
            slot = self._top
            self._top += 1
        SLOT.pack_into(self._map, slot * SLOT.size, ino, kind, dirty, orphan)
        return slot + 1

    def remove(self, fh: int) -> None:
        self._map[(fh - 1) * SLOT.size + 8] = FREE
        self._free.append(fh - 1)

    def mark(self, fh: int, dirty: bool) -> None:
        self._map[(fh - 1) * SLOT.size + 9] = dirty

    def mark_orphan(self, fh: int, orphan: bool) -> None:
        self._map[(fh - 1) * SLOT.size + 10] = orphan

    def close(self) -> None:
        self._map.close()
        self._file.close()
