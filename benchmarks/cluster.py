"""Cluster throughput through the client library: metadata ops/s and streaming MB/s.

Starts a master and one worker on loopback (LocalCluster), then measures, from one client
process: create / stat / unlink with 16 concurrent callers, one stream writing a file
to the worker and reading it back, then 4 KiB reads at random offsets of that file (mostly
from the disk: short-circuit I/O writes and reads 1 MiB pieces past the worker's page
cache, so the stream leaves little there). The client is on the worker's host, so data goes
through short-circuit I/O (the block files themselves) unless --no-short-circuit. Prints a
table of min/median/max over the runs and writes benchmarks/results/cluster.json.

    python benchmarks/cluster.py            # 3 runs, 20,000 files, 1 GiB stream
    python benchmarks/cluster.py --quick    # 3 short runs
    python benchmarks/cluster.py --no-short-circuit   # data over TCP through the worker
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import _results  # noqa: E402 - benchmarks/ is on sys.path when run

from fusecsi.cluster.client import ROOT_INO, ClusterClient  # noqa: E402
from fusecsi.cluster.local import LocalCluster  # noqa: E402

TARGETS = {
    "create": 5000,
    "stat": 15000,
    "unlink": 5000,
    "write_MBps": 400,
    "read_MBps": 400,
    "randread_iops": 3000,
}
RANDOM_READS = 5000


async def metadata_run(client: ClusterClient, run: int, files: int, callers: int) -> dict:
    top = await client.mkdir(ROOT_INO, f"meta{run}".encode(), 0o755, 0, 0)
    per = files // callers
    inos: list[list[int]] = [[] for _ in range(callers)]

    async def timed(worker) -> float:
        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for c in range(callers):
                nursery.start_soon(worker, c)
        return per * callers / (time.perf_counter() - start)

    async def create(c: int) -> None:
        for i in range(per):
            attr = await client.create(top.ino, b"f%d-%d" % (c, i), 0o644, 0, 0)
            inos[c].append(attr.ino)

    async def stat(c: int) -> None:
        for ino in inos[c]:
            await client.getattr(ino)

    async def unlink(c: int) -> None:
        for i in range(per):
            await client.unlink(top.ino, b"f%d-%d" % (c, i))

    return {"create": await timed(create), "stat": await timed(stat), "unlink": await timed(unlink)}


async def stream_run(client: ClusterClient, run: int, total: int, chunk: int) -> dict:
    attr = await client.create(ROOT_INO, f"stream{run}".encode(), 0o644, 0, 0)
    data = os.urandom(chunk)
    start = time.perf_counter()
    for offset in range(0, total, chunk):
        await client.write(attr.ino, offset, data)
    await client.commit(attr.ino, total)
    write = total / (time.perf_counter() - start) / 1e6
    start = time.perf_counter()
    for offset in range(0, total, chunk):
        back = await client.read(attr.ino, offset, chunk)
        if len(back) != chunk:
            raise AssertionError(f"short read at {offset}")
    read = total / (time.perf_counter() - start) / 1e6
    if await client.read(attr.ino, total - chunk, chunk) != data:
        raise AssertionError("data read back differs")
    offsets = [random.randrange(total // 4096) * 4096 for _ in range(RANDOM_READS)]
    start = time.perf_counter()
    for offset in offsets:
        if len(await client.read(attr.ino, offset, 4096)) != 4096:
            raise AssertionError(f"short read at {offset}")
    iops = RANDOM_READS / (time.perf_counter() - start)
    await client.unlink(ROOT_INO, f"stream{run}".encode())
    return {"write_MBps": write, "read_MBps": read, "randread_iops": iops}


async def bench(addrs: str, args) -> list[dict]:
    runs = []
    async with ClusterClient(addrs, short_circuit=not args.no_short_circuit) as client:
        for run in range(args.runs):
            row = await metadata_run(client, run, args.files, args.callers)
            row.update(await stream_run(client, run, args.stream_mib << 20, args.chunk_mib << 20))
            print(f"run {run + 1}: " + ", ".join(f"{k} {v:,.0f}" for k, v in row.items()))
            runs.append(row)
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs (smoke test)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--callers", type=int, default=16)
    parser.add_argument("--stream-mib", type=int, default=1024)
    parser.add_argument("--chunk-mib", type=int, default=8)
    parser.add_argument(
        "--data-dir", help="where the cluster keeps its files (default: a temp dir)"
    )
    parser.add_argument(
        "--no-short-circuit", action="store_true", help="data over TCP through the worker"
    )
    args = parser.parse_args()
    if args.quick:
        args.files, args.stream_mib = 2000, 128
    with tempfile.TemporaryDirectory(dir=args.data_dir) as tmp:
        with LocalCluster(
            tmp, workers=1, log_level="WARNING", short_circuit=not args.no_short_circuit
        ) as cluster:
            runs = trio.run(bench, cluster.master_addrs, args)
    summary = {}
    print(f"\n{'metric':<12}{'min':>12}{'median':>12}{'max':>12}{'target':>10}")
    for key, target in TARGETS.items():
        values = [r[key] for r in runs]
        summary[key] = {
            "min": min(values),
            "median": statistics.median(values),
            "max": max(values),
            "target": target,
            "unit": "MB/s" if key.endswith("MBps") else "ops/s",
        }
        s = summary[key]
        print(f"{key:<12}{s['min']:>12,.0f}{s['median']:>12,.0f}{s['max']:>12,.0f}{target:>10,}")
    document = {
        "benchmark": "cluster",
        "quick": args.quick,
        "setup": {
            "workers": 1,
            "short_circuit": not args.no_short_circuit,
            "callers": args.callers,
            "files": args.files,
            "stream_bytes": args.stream_mib << 20,
            "chunk_bytes": args.chunk_mib << 20,
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "runs": runs,
        "summary": summary,
    }
    _results.write("cluster", args.quick, document, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
