"""A process living on a FUSE mount while its daemon is killed and replaced (takeover tests).

`takeover_load.py DIR RESULT`: with its working directory in DIR it runs, one thread each,
a reader of a file it holds open, relative-path calls through its cwd, reads through an
mmap (pages dropped each round, so faults reach the daemon), and an appender that fsyncs
every record. It prints READY once set up, runs until stdin closes, then writes a JSON
report to RESULT: per worker the calls made, the longest call and every error. The appender
counts an EIO separately ("lost": writes acknowledged but not fsync'd when a daemon died,
reported as the contract says); it then reopens and checks that every fsync'd record is
there, exactly.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

RECORD = 16
STALL = 0.05
HELD_SIZE = 1 << 20
MAP_SIZE = 4 << 20
stop = threading.Event()


def pattern(size: int, seed: int) -> bytes:
    return (b"%015d\n" % seed) * (size // RECORD)


class Worker:
    def __init__(self) -> None:
        self.calls = 0
        self.longest = 0.0
        self.errors: list[str] = []
        self.lost = 0
        self.stalls: list[float] = []  # calls slower than STALL seconds

    def timed(self, fn, *args):
        start = time.monotonic()
        try:
            return fn(*args)
        finally:
            took = time.monotonic() - start
            self.longest = max(self.longest, took)
            self.calls += 1
            if took > STALL:
                self.stalls.append(took)

    def run(self, body) -> None:
        while not stop.is_set():
            try:
                body()
            except Exception as exc:  # every error is reported
                self.errors.append(repr(exc))
                time.sleep(0.05)


def held(w: Worker, fd: int, data: bytes) -> None:
    def body():
        if w.timed(os.pread, fd, 4096, (w.calls * 4096) % HELD_SIZE) != data[:4096]:
            w.errors.append("held file read back other bytes")

    w.run(body)


def cwd(w: Worker) -> None:
    def body():
        w.timed(os.stat, "held")
        if "held" not in w.timed(os.listdir, "."):
            w.errors.append("listing lost a name")
        with open("mapped", "rb") as f:
            w.timed(f.read, 4096)

    w.run(body)


def mapped(w: Worker, data: bytes) -> None:
    with open("mapped", "rb") as f:
        view = mmap.mmap(f.fileno(), MAP_SIZE, prot=mmap.PROT_READ)
        fd = f.fileno()

        def body():
            page = (w.calls * 7919 % (MAP_SIZE // 4096)) * 4096
            if w.timed(lambda: view[page : page + 64]) != data[page : page + 64]:
                w.errors.append("mapped page read back other bytes")
            if w.calls % 64 == 0:  # drop the pages: the next faults go to the daemon
                view.madvise(mmap.MADV_DONTNEED)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

        w.run(body)
        view.close()


def appender(w: Worker) -> None:
    synced = 0
    fd = os.open("log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    while not stop.is_set():
        try:
            w.timed(os.write, fd, b"%015d\n" % synced)
            w.timed(os.fsync, fd)
            synced += 1
        except OSError as exc:
            if exc.errno != errno.EIO:
                w.errors.append(repr(exc))
            w.lost += 1
            os.close(fd)  # the loss is reported until the file is closed
            fd = os.open("log", os.O_WRONLY | os.O_APPEND)
            with open("log", "rb") as f:
                content = f.read()
            # what fsync acknowledged is there; one more record if its commit landed
            if content not in (_records(synced), _records(synced + 1)):
                w.errors.append(f"log holds {len(content)} bytes after {synced} fsyncs")
            synced = len(content) // RECORD
    os.close(fd)
    with open("log", "rb") as f:
        if f.read() != _records(synced):
            w.errors.append("log differs from the fsync'd records")


def _records(n: int) -> bytes:
    return b"".join(b"%015d\n" % i for i in range(n))


def main() -> None:
    directory, result = sys.argv[1], sys.argv[2]
    os.chdir(directory)
    data = pattern(MAP_SIZE, 7)
    for name, size in (("held", HELD_SIZE), ("mapped", MAP_SIZE)):
        with open(name, "wb") as f:
            f.write(data[:size])
            os.fsync(f.fileno())
    fd = os.open("held", os.O_RDONLY)
    workers = {name: Worker() for name in ("held", "cwd", "mapped", "appender")}
    threads = [
        threading.Thread(target=held, args=(workers["held"], fd, data)),
        threading.Thread(target=cwd, args=(workers["cwd"],)),
        threading.Thread(target=mapped, args=(workers["mapped"], data)),
        threading.Thread(target=appender, args=(workers["appender"],)),
    ]
    for t in threads:
        t.start()
    print("READY", flush=True)
    sys.stdin.read()
    stop.set()
    for t in threads:
        t.join()
    os.close(fd)
    report = {name: vars(w) for name, w in workers.items()}
    with open(result, "w") as f:
        json.dump(report, f)


def start(directory, result) -> subprocess.Popen:
    """Run the load in a process of its own (never the test's: see KeptMount)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen(
        [sys.executable, __file__, str(directory), str(result)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout.readline() == b"READY\n"
    return proc


def finish(proc: subprocess.Popen, result) -> dict:
    proc.stdin.close()
    assert proc.wait(timeout=120) == 0
    return json.loads(Path(result).read_text())


def summary(report: dict) -> str:
    """Calls, EIOs for lost writes, and the stalls: how many, median, 99th percentile, longest."""
    out = {}
    for name, w in report.items():
        stalls = sorted(w["stalls"]) or [0.0]
        p50, p99 = (
            round(stalls[min(len(stalls) - 1, int(q * len(stalls)))], 3) for q in (0.5, 0.99)
        )
        out[name] = dict(calls=w["calls"], lost=w["lost"], stalls=len(w["stalls"]))
        out[name].update(p50=p50, p99=p99, longest=round(w["longest"], 3))
    return json.dumps(out)


if __name__ == "__main__":
    main()
