"""How fast the controller provisions: CreateVolume and DeleteVolume as external-provisioner
sends them.

    python benchmarks/controller.py            # full run
    python benchmarks/controller.py --quick    # short smoke run

Real processes on this machine: a LocalCluster (master + one worker) and `fusecsi controller`
on a unix socket. N CreateVolume calls, then N DeleteVolume calls, `--concurrency` in flight
(16, like a busy provisioner); each call is a full volume: one `mkvolume` (a directory born
tagged and sized, synced before the master answers) / tag check, tree removal and a journal
sync. Also one call at a time, to split queueing from work. Targets: CreateVolume p99 < 50 ms,
1,000 volumes created in < 30 s. The CPU columns are the controller's, the master's and this
client's CPU time per call (from /proc): on a 2-core machine shared with other work they say
what a quieter machine could reach; run it when `uptime` shows a load below ~1.5.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import _results  # noqa: E402 - benchmarks/ is on sys.path when run

from fusecsi.cluster.local import LocalCluster  # noqa: E402
from fusecsi.csi import bridge as grpc_bridge  # noqa: E402
from fusecsi.csi.generated import csi_pb2 as pb  # noqa: E402

Mode = pb.VolumeCapability.AccessMode
MOUNT = pb.VolumeCapability(
    mount=pb.VolumeCapability.MountVolume(), access_mode=Mode(mode=Mode.SINGLE_NODE_WRITER)
)


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def summary(samples: list[float], wall: float, cpu: dict[str, float]) -> dict:
    ms = [s * 1000 for s in samples]
    return {
        **{f"{name}_cpu_ms_per_call": round(sec * 1000 / len(ms), 2) for name, sec in cpu.items()},
        "n": len(ms),
        "wall_s": round(wall, 3),
        "per_s": round(len(ms) / wall, 1),
        "p50_ms": round(percentile(ms, 50), 2),
        "p99_ms": round(percentile(ms, 99), 2),
        "mean_ms": round(statistics.fmean(ms), 2),
        "max_ms": round(max(ms), 2),
    }


def start_controller(work: Path) -> tuple[subprocess.Popen, Path]:
    sock = work / "controller.sock"
    log = open(work / "controller.log", "wb")  # noqa: SIM115 (lives as long as the process)
    proc = subprocess.Popen(
        [sys.executable, "-m", "fusecsi", "controller", "--endpoint", f"unix://{sock}"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "KUBECONFIG": ""},
    )
    deadline = time.monotonic() + 30
    while not sock.exists():  # the path appears only once the controller listens
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"controller did not start: {(work / 'controller.log').read_text()}")
        time.sleep(0.05)
    return proc, sock


async def run_calls(call, method: str, requests: list, concurrency: int) -> tuple:
    latencies: list[float] = []
    replies: list = [None] * len(requests)
    limiter = trio.CapacityLimiter(concurrency)

    async def one(i: int) -> None:
        async with limiter:
            started = time.perf_counter()
            replies[i] = await call("Controller", method, requests[i])
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for i in range(len(requests)):
            nursery.start_soon(one, i)
    return latencies, time.perf_counter() - started, replies


async def bench(
    sock: Path, master_addrs: str, pids: dict, volumes: int, sequential: int, concurrency: int
):
    parameters = {"master-addrs": master_addrs, "fs-path": "/bench"}

    def creates(prefix: str, n: int) -> list:
        return [
            pb.CreateVolumeRequest(
                name=f"{prefix}-{i:05d}",
                parameters=parameters,
                volume_capabilities=[MOUNT],
                capacity_range=pb.CapacityRange(required_bytes=1 << 30),
            )
            for i in range(n)
        ]

    def deletes(replies: list) -> list:
        return [pb.DeleteVolumeRequest(volume_id=r.volume.volume_id) for r in replies]

    results = {}
    async with grpc_bridge.connect(str(sock)) as call:

        async def phase(name: str, method: str, requests: list, in_flight: int) -> list:
            before = {role: cpu_seconds(pid) for role, pid in pids.items()}
            lat, wall, replies = await run_calls(call, method, requests, in_flight)
            cpu = {role: cpu_seconds(pid) - before[role] for role, pid in pids.items()}
            results[name] = summary(lat, wall, cpu)
            return replies

        await run_calls(call, "CreateVolume", creates("warmup", 20), 4)  # connections, caches
        replies = await phase("create", "CreateVolume", creates("pvc", volumes), concurrency)
        await phase("create_again_idempotent", "CreateVolume", creates("pvc", volumes), concurrency)
        await phase("delete", "DeleteVolume", deletes(replies), concurrency)
        replies = await phase("create_one_at_a_time", "CreateVolume", creates("seq", sequential), 1)
        await phase("delete_one_at_a_time", "DeleteVolume", deletes(replies), 1)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run")
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    volumes, sequential = (100, 20) if args.quick else (1000, 200)
    with tempfile.TemporaryDirectory(prefix="fusecsi-bench-controller-") as tmp:
        work = Path(tmp)
        with LocalCluster(work / "cluster", workers=1, log_level="WARNING") as cluster:
            proc, sock = start_controller(work)
            try:
                # this script is the CSI client (external-provisioner's part): Python too
                pids = {"controller": proc.pid, "master": cluster.master.pid, "client": os.getpid()}
                results = trio.run(
                    bench, sock, cluster.master_addrs, pids, volumes, sequential, args.concurrency
                )
            finally:
                proc.terminate()
                proc.wait(timeout=15)
    targets = {
        "create_p99_under_50ms": results["create"]["p99_ms"] < 50,
        "1000_volumes_under_30s": results["create"]["wall_s"] * 1000 / volumes < 30,
    }
    print(
        f"controller: {volumes} volumes, {args.concurrency} in flight (one at a time: {sequential})"
    )
    header = (
        f"{'calls':<26}{'n':>6}{'wall s':>9}{'per s':>9}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}"
        f"{'ctl cpu ms':>12}{'master cpu ms':>15}{'client cpu ms':>15}"
    )
    print(header)
    print("-" * len(header))
    for name, row in results.items():
        print(
            f"{name:<26}{row['n']:>6}{row['wall_s']:>9}{row['per_s']:>9}"
            f"{row['p50_ms']:>9}{row['p99_ms']:>9}{row['max_ms']:>9}"
            f"{row['controller_cpu_ms_per_call']:>12}{row['master_cpu_ms_per_call']:>15}"
            f"{row['client_cpu_ms_per_call']:>15}"
        )
    for name, ok in targets.items():
        print(f"target {name}: {'met' if ok else 'MISSED'}")
    document = {
        "name": "controller",
        "quick": args.quick,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "kernel": platform.release(),
            "loadavg_at_end": list(os.getloadavg()),
        },
        "params": {"volumes": volumes, "sequential": sequential, "concurrency": args.concurrency},
        "results": results,
        "targets": targets,
    }
    _results.write("controller", args.quick, document)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
