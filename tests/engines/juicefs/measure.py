"""Measure JuiceFS under fusecsi's Launch: launch-to-ready time and sequential MB/s.

    python tests/engines/juicefs/measure.py [--mib 256] [--runs 3]

Redis metadata and a local-directory object store on this machine (so the figures show the
FUSE client's overhead, not a network's). Not a test: no timed assertions anywhere.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/ (engines.juicefs.*)

from engines.juicefs.launching import Running  # noqa: E402

from fusecsi.engines.juicefs import NODE  # noqa: E402
from fusecsi.engines.juicefs.local import redis_backend  # noqa: E402

MiB = 1024 * 1024


def sequential_write(path: Path, mib: int) -> float:
    block = os.urandom(MiB)
    started = time.monotonic()
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    return mib / (time.monotonic() - started)


def sequential_read(path: Path) -> float:
    started = time.monotonic()
    size = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(MiB):
            size += len(chunk)
    return size / MiB / (time.monotonic() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, redis_backend(Path(tmp)) as fs:
        mnt = Path(tmp) / "mnt"
        mnt.mkdir()
        launch = NODE.launch(fs.cluster, "/", {}, str(mnt))
        ready, writes, reads = [], [], []
        for run in range(args.runs):
            running = Running(launch, Path(tmp) / f"private-{run}", mnt)
            try:
                ready.append(running.wait_ready(NODE.fstype))
                writes.append(sequential_write(mnt / f"f{run}", args.mib))
            finally:
                running.stop()
            # read back through a fresh daemon with an empty cache dir: from the object store
            running = Running(launch, Path(tmp) / f"private-read-{run}", mnt)
            try:
                running.wait_ready(NODE.fstype)
                reads.append(sequential_read(mnt / f"f{run}"))
            finally:
                running.stop()
        print(
            f"launch to ready: median {statistics.median(ready) * 1000:.0f} ms "
            f"(runs: {', '.join(f'{r * 1000:.0f}' for r in ready)})"
        )
        print(
            f"sequential write {args.mib} MiB + fsync: median {statistics.median(writes):.0f} MiB/s"
        )
        print(f"sequential read (fresh daemon): median {statistics.median(reads):.0f} MiB/s")


if __name__ == "__main__":
    main()
