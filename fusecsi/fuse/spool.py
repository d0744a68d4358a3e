"""Writes that write() acknowledged and no commit covered yet, kept outside the daemon.

With takeover (takeover.py) the FUSE connection outlives its daemon, and so must every
write the daemon acknowledged: until a flush, fsync or close commits it, a write exists in
the daemon's write-back buffer and in pieces on their way to the workers, both in its
memory. So before a write is acknowledged its bytes are also appended to a journal of its
inode in the connection's directory, `spool/<ino>.<seq>` (records: offset, length, bytes,
in the order the writes were made). A replacement daemon replays the journal of every
inode it adopts through its own write path and commits it (handles.adopt_handles).

Why this is safe:
- Order: the record is written (pwritev into the page cache, one syscall) before write()
  is answered. A daemon that dies before the record is complete never answered that write:
  the kernel resends it to the next daemon (FUSE_NOTIFY_RESEND), and a torn record at the
  end of a journal is ignored. The promise is about the death of the process: page cache
  is enough (writes not fsync'd were never promised across a machine crash).
- Dropping: a commit takes a mark first (`mark`); once it succeeded every record before
  the mark is covered and dropped (`covered`). Writes made while the commit was in flight
  go to a new segment and stay. Commits of one inode are serialized (WriteBuffer.sizing).
- Truncate: a size change publishes the writes before it (ClusterClient.setattr), so it
  covers the records before it in the same way. A daemon that dies in the middle has not
  answered it: the replayed writes are cut again by the resent request.
- Two handles of one inode share one journal (one OpenInode): replay keeps their order.
- A record that cannot be written (the connection's directory full) makes that write
  commit before it is acknowledged, so what the journal misses is on the cluster.
- The journal of an inode goes with the last close of its handles, and with the connection
  (mountd removes the connection's directory; takeover.mount empties it for a new one).
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Iterator

SPOOL_DIR = "spool"
HEADER = struct.Struct("<QI")  # offset, length; the bytes follow
# Past this many journaled bytes a file is committed early, so a writer that never fsyncs
# does not hold the whole file twice (and its journal stays in the page cache).
LIMIT = 64 << 20


class SpoolDir:
    """The journals of one connection."""

    __slots__ = ("path", "existed")

    def __init__(self, path: str) -> None:
        self.path = path
        # A connection served before by a daemon without journals: its uncommitted writes
        # are lost, not journaled (see adopt_handles).
        self.existed = os.path.isdir(path)
        os.makedirs(path, mode=0o700, exist_ok=True)

    def segments(self) -> dict[int, list[int]]:
        """ino -> sequence numbers of its journal's segments, in order."""
        out: dict[int, list[int]] = {}
        for name in os.listdir(self.path):
            ino, _, seq = name.partition(".")
            if ino.isdigit() and seq.isdigit():
                out.setdefault(int(ino), []).append(int(seq))
        for seqs in out.values():
            seqs.sort()
        return out

    def spool(self, ino: int, old: list[int] | None = None) -> Spool:
        return Spool(self.path, ino, old or [])

    def remove(self, ino: int, seqs: list[int]) -> None:
        for seq in seqs:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.path, f"{ino}.{seq}"))


class Spool:
    """The journal of one open inode: segments `<ino>.<seq>`, the newest one open."""

    __slots__ = ("_dir", "ino", "seq", "_fd", "length", "total", "_sizes", "_rotate")

    def __init__(self, directory: str, ino: int, old: list[int]) -> None:
        self._dir = directory
        self.ino = ino
        self._sizes = {seq: -1 for seq in old}  # segments a dead daemon left (size unknown)
        self.seq = old[-1] + 1 if old else 0
        self._fd: int | None = None
        self.length = 0  # of the current segment
        self.total = 0  # bytes journaled since the last covering commit (this daemon's)
        self._rotate = False

    def _path(self, seq: int) -> str:
        return os.path.join(self._dir, f"{self.ino}.{seq}")

    def old_records(self) -> Iterator[tuple[int, bytes]]:
        """The writes of the segments a dead daemon left, in order; a torn last record (its
        write was never acknowledged) ends a segment."""
        for seq in sorted(self._sizes):
            try:
                with open(self._path(seq), "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                continue
            at = 0
            while at + HEADER.size <= len(data):
                offset, length = HEADER.unpack_from(data, at)
                at += HEADER.size
                if at + length > len(data):
                    break
                yield offset, data[at : at + length]
                at += length

    def append(self, offset: int, data: bytes) -> bool:
        """Journal a write (before it is acknowledged); False when it could not be."""
        try:
            if self._fd is None or self._rotate:
                self._open_next()
            header = HEADER.pack(offset, len(data))
            written = os.pwritev(self._fd, [header, data], self.length)
        except OSError:
            written = -1
        if written != HEADER.size + len(data):
            if self._fd is not None:  # never leave a torn record before a later one
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, self.length)
            return False
        self.length += written
        self.total += written
        return True

    def _open_next(self) -> None:
        if self._fd is not None:
            self._sizes[self.seq] = self.length
            os.close(self._fd)
            self._fd = None
            self.seq += 1
        self._fd = os.open(
            self._path(self.seq), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600
        )
        self.length = 0
        self._rotate = False

    def mark(self) -> tuple[int, int]:
        """Taken by a commit before it starts: later writes go to a new segment."""
        if self.length:
            self._rotate = True
        return self.seq, self.length

    def covered(self, mark: tuple[int, int]) -> None:
        """The commit that took `mark` succeeded: drop every record written before it."""
        seq, length = mark
        done = [s for s in self._sizes if s < seq or (s == seq and self.seq > seq)]
        for s in done:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(s))
            del self._sizes[s]
        if self.seq == seq and self.length == length and self.length:
            # nothing written since the mark: empty the open segment and keep using it
            try:
                os.ftruncate(self._fd, 0)
                self.length = 0
                self._rotate = False
            except OSError:  # kept whole (replaying covered writes again is harmless)
                pass
        self.total = self.length + sum(max(0, n) for n in self._sizes.values())

    def drop(self) -> None:
        """Nobody holds the inode open any more: the journal goes."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        for seq in [*self._sizes, self.seq]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(seq))
        self._sizes.clear()
        self.length = self.total = 0
