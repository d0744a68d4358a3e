"""Write-ahead journal with group commit, plus checkpoints that let it be truncated.

Layout of the data directory:
  journal-<N>.log       records [u32 length][u32 crc32][msgpack record], appended in order
  checkpoint-<N>.mp     the namespace after every record of the segments before N

A record is acknowledged only after `sync(ticket)` returns, i.e. after the writer task has
written and fdatasync'd it; concurrent mutations queue behind one write + fsync and share
it. Opening replays the newest checkpoint and the segments after it; a torn record at the
end of the last segment (a crash mid-write) was never acknowledged and is dropped.
A new segment is started at every open, so a torn tail is never appended to.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import signal
import struct
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


class JournalCorrupt(RuntimeError):
    pass


def read_segment(path: Path, last: bool) -> list:
    data = path.read_bytes()
    records, pos = [], 0
    while pos < len(data):
        if pos + RECORD.size > len(data):
            break
        length, crc = RECORD.unpack_from(data, pos)
        body = data[pos + RECORD.size : pos + RECORD.size + length]
        if len(body) < length or zlib.crc32(body) != crc:
            break
        records.append(_unpack(body))
        pos += RECORD.size + length
    if pos < len(data):
        if not last:
            raise JournalCorrupt(f"{path}: bad record at offset {pos} in a sealed segment")
        log.warning("dropping torn journal tail", extra=fields(path=str(path), offset=pos))
    return records


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
        self._pending: list[Any] = []  # bytes, or ("rotate", segment number)
        self._appended = 0
        self._synced = 0
        self._wake = trio.Event()
        self._synced_event = trio.Event()
        self.failed: BaseException | None = None
        self.records_in_segment = 0
        self.fsync_seconds = Distribution(
            "fusecsi_master_journal_fsync_seconds", "time one journal write + fdatasync takes"
        )
        self.group_size = Distribution(
            "fusecsi_master_journal_group_records",
            "records committed together by one journal fdatasync",
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
        replay = [(n, p) for n, p in segments if n >= start]
        for i, (_, path) in enumerate(replay):
            records.extend(read_segment(path, last=i == len(replay) - 1))
        newest = max([start - 1] + [n for n, _ in segments])
        self.segment = newest + 1
        self._fd = self._open_segment(self.segment)
        return state, records

    def _open_segment(self, number: int) -> int:
        fd = os.open(
            self.dir / f"journal-{number}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600
        )
        fsync_dir(self.dir)
        return fd

    # ------------------------------------------------------------ appending

    def append(self, record: list) -> int:
        """Queue a record; returns the ticket to pass to `sync`."""
        if self.failed is not None:
            raise OSError(5, "journal failed; the master must restart")
        body = _pack(record)
        self._pending.append(RECORD.pack(len(body), zlib.crc32(body)) + body)
        self._appended += 1
        self.records_in_segment += 1
        self._wake.set()
        return self._appended

    async def sync(self, ticket: int) -> None:
        while self._synced < ticket:
            if self.failed is not None:
                raise OSError(5, "journal write failed")
            await self._synced_event.wait()

    async def write(self, record: list) -> None:
        await self.sync(self.append(record))

    def rotate(self) -> int:
        """Start a new segment with the next record; returns the new segment's number."""
        self.segment += 1
        self.records_in_segment = 0
        self._pending.append(("rotate", self.segment))
        self._wake.set()
        return self.segment

    def _write_batch(self, items: list) -> None:
        chunk: list[bytes] = []
        for item in items:
            if isinstance(item, tuple):
                self._flush(chunk)
                chunk = []
                os.close(self._fd)
                self._fd = self._open_segment(item[1])
            else:
                chunk.append(item)
        self._flush(chunk)

    def _flush(self, chunk: list[bytes]) -> None:
        if not chunk:
            return
        started = time.monotonic()
        data = b"".join(chunk)
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        os.fdatasync(self._fd)
        self.fsync_seconds.observe(time.monotonic() - started)
        self.group_size.observe(len(chunk))

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """The writer task: one write + fdatasync per batch of queued records."""
        limiter = trio.CapacityLimiter(1)
        task_status.started()
        try:
            while True:
                if not self._pending:
                    await self._wake.wait()
                    self._wake = trio.Event()
                    continue
                # let mutations that are already runnable append first: bigger batches
                await trio.lowlevel.checkpoint()
                items, self._pending = self._pending, []
                upto = self._appended
                await trio.to_thread.run_sync(self._write_batch, items, limiter=limiter)
                self._synced = upto
                event, self._synced_event = self._synced_event, trio.Event()
                event.set()
        except BaseException as exc:
            self.failed = exc
            self._synced_event.set()
            raise
        finally:
            with trio.CancelScope(shield=True):
                if self._pending and self.failed is None:
                    await trio.to_thread.run_sync(self._write_batch, self._pending, limiter=limiter)
                    self._pending = []

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
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
