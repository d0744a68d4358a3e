"""Writes that write() acknowledged and no commit covered yet, kept outside the daemon.

With takeover (takeover.py) the FUSE connection outlives its daemon, and so must every
write the daemon acknowledged: until a flush, fsync or close commits it, a write exists in
the daemon's write-back buffer and in pieces on their way to the workers, both in its
memory. So before a write is acknowledged its bytes are also appended to a journal of its
inode in the connection's directory, `spool/<ino>.<seq>` (records: offset, length, bytes,
in the order the writes were made; a segment a commit covered is reused in place, so a file
holds at most about LIMIT bytes of journal while it is open). A replacement daemon replays the journal of every
inode it adopts through its own write path and commits it (handles.adopt_handles).

Why this is safe:
- Order: the record is written (pwritev into the page cache, one syscall) before write()
  is answered. A daemon that dies before the record is complete never answered that write:
  the kernel resends it to the next daemon (FUSE_NOTIFY_RESEND), and a torn record is
  ignored (see Spool). The promise is about the death of the process: page cache
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
import errno
import os
import struct
from collections.abc import Iterator

SPOOL_DIR = "spool"
GEN = 8  # a segment's generation: random bytes
START = GEN  # the first record's place in a segment
HEADER = struct.Struct("<QI8s")  # offset, length, generation; the bytes and the generation follow
# Past this many journaled bytes a file is committed early, so a writer that never fsyncs
# does not hold the whole file twice (and its journal stays in the page cache).
LIMIT = 64 << 20


class SpoolDir:
    """The journals of one connection."""

    __slots__ = ("path", "existed")

    def __init__(self, path: str) -> None:
        self.path = path
        # False on a connection served before by a daemon without journals: its uncommitted
        # writes were not journaled but lost (see adopt_handles).
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
    """The journal of one open inode: segments `<ino>.<seq>`, the newest one open.

    A segment starts with its generation (8 random bytes); each record is a header (offset,
    length, generation), the bytes, and the generation again. A segment a commit covered
    whole is reused in place under a new generation: its pages stay in the page cache, so a
    record costs one copy and no page allocation (about half the cost of writing into a
    truncated file here). Reading stops at the first record that is not whole and of the
    segment's generation: older records left behind, or a torn one (its last bytes are
    written last, and a write torn by the daemon's death was never acknowledged).
    """

    __slots__ = ("_dir", "ino", "seq", "_fd", "length", "total", "_sizes", "_rotate", "_gen")

    def __init__(self, directory: str, ino: int, old: list[int]) -> None:
        self._dir = directory
        self.ino = ino
        self._sizes = {seq: -1 for seq in old}  # segments a dead daemon left (size unknown)
        self.seq = old[-1] + 1 if old else 0
        self._fd: int | None = None
        self.length = START  # where the next record goes in the current segment
        self.total = 0  # bytes journaled since the last covering commit (this daemon's)
        self._rotate = False
        self._gen = b""

    def _path(self, seq: int) -> str:
        return os.path.join(self._dir, f"{self.ino}.{seq}")

    def old_records(self) -> Iterator[tuple[int, bytes]]:
        """The writes of the segments a dead daemon left, in order."""
        for seq in sorted(self._sizes):
            try:
                with open(self._path(seq), "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                continue
            yield from records(data)

    def append(self, offset: int, data: bytes) -> bool:
        """Journal a write (before it is acknowledged); False when it could not be (what
        was written of it is no record: the next one goes to the same place)."""
        try:
            if self._fd is None or self._rotate:
                self._open_next()
            header = HEADER.pack(offset, len(data), self._gen)
            written = os.pwritev(self._fd, [header, data, self._gen], self.length)
        except OSError:
            return False
        if written != HEADER.size + len(data) + GEN:
            return False
        self.length += written
        self.total += written
        return True

    def _open_next(self) -> None:
        if self._fd is not None:
            self._sizes[self.seq] = self.length - START
            os.close(self._fd)
            self._fd = None
            self.seq += 1
        self._fd = os.open(self._path(self.seq), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._rotate = False
        self._new_generation()

    def _new_generation(self) -> None:
        """Start the open segment afresh: what it holds is no record any more."""
        gen = os.urandom(GEN)
        if os.pwrite(self._fd, gen, 0) != GEN:
            raise OSError(errno.EIO, "short write of a journal generation")
        self._gen = gen
        self.length = START

    def mark(self) -> tuple[int, int]:
        """Taken by a commit before it starts: later writes go to a new segment."""
        if self.length > START:
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
        if self.seq == seq and self.length == length and self.length > START:
            # nothing written since the mark: reuse the open segment
            try:
                self._new_generation()
                self._rotate = False
            except OSError:  # kept whole (replaying covered writes again is harmless)
                pass
        self.total = self.length - START + sum(max(0, n) for n in self._sizes.values())

    def drop(self) -> None:
        """Nobody holds the inode open any more: the journal goes."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        for seq in [*self._sizes, self.seq]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(seq))
        self._sizes.clear()
        self.length, self.total = START, 0


def records(data: bytes) -> Iterator[tuple[int, bytes]]:
    """The whole records of one segment's content, in order."""
    gen = data[:GEN]
    at = START
    while at + HEADER.size <= len(data):
        offset, length, header_gen = HEADER.unpack_from(data, at)
        end = at + HEADER.size + length
        if header_gen != gen or data[end : end + GEN] != gen:
            return
        yield offset, data[at + HEADER.size : end]
        at = end + GEN
