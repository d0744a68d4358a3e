"""Write-ahead journal, synced in the background, plus checkpoints that let it be truncated.

Layout of the data directory:
  journal-<N>.log       records [u32 length][u32 crc32][msgpack record], appended in order
  checkpoint-<N>.mp     the namespace after every record of the segments before N

Durability model (what a local filesystem gives: creat() is durable only after fsync):
- `append(record)` writes the record to the segment with write(2) in the event loop, with no
  thread hop; once it returns the record survives a crash of the master process (the page
  cache keeps it), and the master acknowledges the mutation.
- A syncer thread fdatasyncs continuously: as soon as one fdatasync ends it starts the next
  if records were written meanwhile, so an unsynced record is at most about one fdatasync
  old. `sync(ticket)` returns once every record up to that ticket is on disk; callers that
  promise durability (sync_journal, mkvolume, id reservations, block deletions) wait for it.
- `synced` only ever covers a prefix of the journal: a segment's records count as synced once
  it and every older segment were fdatasync'd (and the directory, for a new segment).
- After a power loss the disk holds a prefix of the journal plus perhaps a few later pages.
  Recovery replays records up to the first torn or missing one, truncates that segment
  there and sets the later segments aside (`*.log.dropped`): none of their records was ever
  reported synced, so what is replayed is always a consistent prefix.
A new segment is started at every open, so a torn tail is never appended to.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import signal
import struct
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import trio

from fusecsi.logs import fields
from fusecsi.metrics import Distribution

log = logging.getLogger(__name__)

RECORD = struct.Struct(">II")
PR_SET_PDEATHSIG = 1
SEGMENT_RE = re.compile(r"journal-(\d+)\.log$")
CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)\.mp$")
_pack = msgpack.Packer(use_bin_type=True, autoreset=True).pack


def _unpack(data) -> Any:
    return msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=False)


def read_segment(path: Path) -> tuple[list, int, bool]:
    """(records, bytes they take, whether anything follows them that is not a record)."""
    data = path.read_bytes()
    records, pos = [], 0
    while pos + RECORD.size <= len(data):
        length, crc = RECORD.unpack_from(data, pos)
        body = data[pos + RECORD.size : pos + RECORD.size + length]
        if not length or len(body) < length or zlib.crc32(body) != crc:
            break
        try:
            records.append(_unpack(body))
        except ValueError:
            break
        pos += RECORD.size + length
    return records, pos, pos < len(data)


def write_file(tmp: Path, final: Path, body: bytes) -> None:
    """Replace `final` with `body` atomically and durably."""
    with open(tmp, "wb") as f:
        f.write(body)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, final)
    fsync_dir(final.parent)


def fork_writer(work: Callable[[], None]) -> int | None:
    """Run `work` in a forked child that dies with its parent; the child's pid, or None
    when fork is not possible. The child touches nothing but `work` and exits."""
    parent = os.getpid()
    try:
        pid = os.fork()
    except OSError:
        return None
    if pid:
        return pid
    code = 1
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() == parent:
            work()
            code = 0
    finally:
        os._exit(code)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    def __init__(self, data_dir: Path) -> None:
        self.dir = data_dir
        self.segment = 0
        self._fd = -1
        self.written = 0  # tickets: records written so far
        self.synced = 0  # records known to be on disk (always a prefix)
        self.records_in_segment = 0
        self.failed: BaseException | None = None
        # shared with the syncer thread, under _cond
        self._cond = threading.Condition()
        self._sealed: list[int] = []  # older segments' fds, still to fdatasync and close
        self._dir_dirty = False  # a new segment's directory entry is not synced yet
        self._stopping = False
        self._thread: threading.Thread | None = None
        # event-loop side of waiting for the syncer
        self._token: trio.lowlevel.TrioToken | None = None
        self._waiters = 0
        self._synced_event = trio.Event()
        self._failed_event = trio.Event()
        self.fsync_seconds = Distribution(
            "fusecsi_master_journal_fsync_seconds", "time one journal fdatasync takes"
        )
        self.group_size = Distribution(
            "fusecsi_master_journal_group_records",
            "records made durable together by one journal fdatasync",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096),
        )

    # ------------------------------------------------------------ recovery

    def recover(self) -> tuple[Any, list]:
        """(newest checkpoint's data or None, records to replay after it); opens a new segment."""
        self.dir.mkdir(parents=True, exist_ok=True)
        checkpoints = sorted(
            (int(m.group(1)), p) for p in self.dir.iterdir() if (m := CHECKPOINT_RE.match(p.name))
        )
        segments = sorted(
            (int(m.group(1)), p) for p in self.dir.iterdir() if (m := SEGMENT_RE.match(p.name))
        )
        state, start = None, 0
        if checkpoints:
            start, path = checkpoints[-1]
            state = _unpack(path.read_bytes())
        records: list = []
        replay = [p for n, p in segments if n >= start]
        for i, path in enumerate(replay):
            found, good, torn = read_segment(path)
            records.extend(found)
            if torn:
                self._cut(path, good, replay[i + 1 :])
                break
        newest = max([start - 1] + [n for n, _ in segments])
        self.segment = newest + 1
        self._fd = self._open_segment(self.segment)
        self._dir_dirty = True  # synced with the first record, as after a rotation
        return state, records

    def _cut(self, path: Path, good: int, later: list[Path]) -> None:
        """A crash left `path` torn at `good`: keep the prefix, set later segments aside.
        Later segments go first: a crash in between then finds the tear again, never a
        clean cut followed by records that came after the lost ones."""
        log.warning(
            "dropping a torn journal tail",
            extra=fields(path=str(path), offset=good, later_segments=len(later)),
        )
        for other in later:
            other.rename(other.with_name(other.name + ".dropped"))
        fsync_dir(self.dir)
        with open(path, "r+b") as f:
            f.truncate(good)
            os.fsync(f.fileno())

    def _open_segment(self, number: int) -> int:
        return os.open(
            self.dir / f"journal-{number}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600
        )

    # ------------------------------------------------------------ appending

    def append(self, record: list) -> int:
        """Write a record (it now survives a crash of this process); returns the ticket to
        pass to `sync` for durability."""
        if self.failed is not None:
            raise OSError(errno.EIO, "journal failed; the master must restart")
        body = _pack(record)
        data = RECORD.pack(len(body), zlib.crc32(body)) + body
        try:
            done = os.write(self._fd, data)
            while done < len(data):  # short writes: a full disk, a signal
                done += os.write(self._fd, data[done:])
        except OSError as exc:
            # a partial record may be on disk: nothing more may follow it in this segment
            self._fail(exc)
            raise OSError(errno.EIO, f"journal write failed: {exc}") from None
        with self._cond:
            self.written += 1
            self._cond.notify()
        self.records_in_segment += 1
        return self.written

    async def sync(self, ticket: int) -> None:
        """Return once every record up to `ticket` is on disk."""
        while self.synced < ticket:
            if self.failed is not None:
                raise OSError(errno.EIO, "journal sync failed; the master must restart")
            # counted before the check, so the syncer either sees us or we see its progress
            self._waiters += 1
            try:
                if self.synced >= ticket:
                    return
                await self._synced_event.wait()
            finally:
                self._waiters -= 1

    async def sync_all(self) -> None:
        await self.sync(self.written)

    async def write(self, record: list) -> None:
        await self.sync(self.append(record))

    def rotate(self) -> int:
        """Start a new segment with the next record; returns the new segment's number."""
        fd = self._open_segment(self.segment + 1)
        self.segment += 1
        self.records_in_segment = 0
        with self._cond:
            self._sealed.append(self._fd)
            self._fd = fd
            self._dir_dirty = True
            self._cond.notify()
        return self.segment

    def _fail(self, exc: BaseException) -> None:
        if self.failed is None:
            self.failed = exc
            log.error("journal failed", extra=fields(error=str(exc)))
        self._synced_event.set()
        self._failed_event.set()

    # ------------------------------------------------------------ the syncer

    def _sync_loop(self) -> None:
        """The syncer thread: fdatasync whenever records were written since the last one."""
        while True:
            with self._cond:
                while self.written == self.synced and not self._sealed and not self._stopping:
                    self._cond.wait()
                if self._stopping and self.written == self.synced and not self._sealed:
                    return
                upto, sealed, fd, new_dir = self.written, self._sealed, self._fd, self._dir_dirty
                self._sealed, self._dir_dirty = [], False
            started = time.monotonic()
            try:
                for old in sealed:
                    os.fdatasync(old)
                    os.close(old)
                os.fdatasync(fd)
                if new_dir:
                    fsync_dir(self.dir)
            except OSError as exc:
                self._notify(self._fail, exc)
                return
            self.fsync_seconds.observe(time.monotonic() - started)
            if upto > self.synced:
                self.group_size.observe(upto - self.synced)
                self.synced = upto
            if self._waiters:
                self._notify(self._release)

    def _notify(self, fn, *args) -> None:
        """Run `fn` on the trio loop (the syncer runs only while `run` holds its token)."""
        try:
            self._token.run_sync_soon(fn, *args)
        except trio.RunFinishedError:
            pass

    def _release(self) -> None:
        event, self._synced_event = self._synced_event, trio.Event()
        event.set()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Owns the syncer thread; raises (stopping the master) if the journal fails."""
        self._token = trio.lowlevel.current_trio_token()
        self._stopping = False
        self._thread = threading.Thread(target=self._sync_loop, name="journal-sync", daemon=True)
        self._thread.start()
        task_status.started()
        try:
            await self._failed_event.wait()
            raise OSError(errno.EIO, f"journal failed: {self.failed}")
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._stop_syncer)
            self._token = None

    def _stop_syncer(self) -> None:
        """Let the syncer write out what is left, then end it."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    # ------------------------------------------------------------ checkpoints

    async def checkpoint(self, dump: Callable[[], Any]) -> None:
        """Write `dump()` (called right after `rotate()`) and delete what it supersedes.

        A forked child builds and writes the snapshot from its copy-on-write view of the
        namespace, so the master keeps serving while a large namespace is written out."""
        number = self.segment
        tmp = self.dir / f"checkpoint-{number}.tmp"
        final = self.dir / f"checkpoint-{number}.mp"
        pid = fork_writer(lambda: write_file(tmp, final, _pack(dump())))
        if pid is None:  # no fork here: do it in line
            await trio.to_thread.run_sync(write_file, tmp, final, _pack(dump()))
        else:
            _, status = await trio.to_thread.run_sync(os.waitpid, pid, 0)
            if os.waitstatus_to_exitcode(status) != 0:
                raise RuntimeError(f"checkpoint writer exited with status {status}")

        def prune() -> None:
            for p in self.dir.iterdir():
                m = SEGMENT_RE.match(p.name) or CHECKPOINT_RE.match(p.name)
                if (m and int(m.group(1)) < number) or p.name.endswith(".tmp"):
                    p.unlink(missing_ok=True)

        await trio.to_thread.run_sync(prune)
        log.info("checkpoint written", extra=fields(segment=number, bytes=final.stat().st_size))

    def close(self) -> None:
        for fd in [*self._sealed, self._fd]:
            if fd >= 0:
                os.close(fd)
        self._sealed, self._fd = [], -1
