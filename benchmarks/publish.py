"""How fast a pod gets its volume: NodePublishVolume as kubelet sees it.

    python benchmarks/publish.py            # full run
    python benchmarks/publish.py --quick    # short smoke run

Real processes on this machine: a LocalCluster (master + one worker), `fusecsi mountd`
(linger 0) and `fusecsi node`. Measures, through the CSI socket:
- warm publish: the key's FUSE daemon already runs (another target holds it), so a publish
  is a bind mount plus bookkeeping;
- cold publish: a key nobody uses yet, so mountd starts a new FUSE daemon first;
- scale: many volumes over a few keys published concurrently (as kubelet starts pods):
  wall time, throughput, daemon count, and the resident memory of daemons and mountd;
and, to split the CSI hop from mountd's own work, warm publishes sent straight to mountd.
Targets: warm p99 < 20 ms, cold p99 < 1 s, 500 volumes over 5 keys in < 15 s, 5 daemons.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import _results  # noqa: E402 - benchmarks/ is on sys.path when run

from fusecsi.cluster.client import ClusterClient  # noqa: E402
from fusecsi.csi import bridge as grpc_bridge  # noqa: E402
from fusecsi.csi.generated import csi_pb2 as pb  # noqa: E402
from fusecsi.dev.stack import DevStack  # noqa: E402
from fusecsi.mountd.client import MountdClient  # noqa: E402

Mode = pb.VolumeCapability.AccessMode
MOUNT = pb.VolumeCapability(
    mount=pb.VolumeCapability.MountVolume(),
    access_mode=Mode(mode=Mode.SINGLE_NODE_WRITER),
)


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summary(samples: list[float]) -> dict:
    """Milliseconds: p50, p99, mean, max, n."""
    ms = [s * 1000 for s in samples]
    return {
        "p50_ms": round(percentile(ms, 50), 2),
        "p99_ms": round(percentile(ms, 99), 2),
        "mean_ms": round(statistics.fmean(ms), 2),
        "max_ms": round(max(ms), 2),
        "n": len(ms),
    }


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def pid_of(*needles: str) -> int:
    """The pid of the process whose command line holds every needle."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if all(n.encode() in cmdline for n in needles):
            return int(pid)
    raise RuntimeError(f"no process runs with {needles}")


class Bench:
    """One simulated node of `fusecsi dev`'s stack (mountd with linger 0, node plugin)."""

    def __init__(self, stack: DevStack) -> None:
        self.stack = stack
        (self.node,) = stack.nodes
        self.cluster = stack.cluster
        self.mountd = MountdClient(f"unix://{self.node.mountd_socket}")
        self.mountd_pid = pid_of("mountd", str(self.node.mountd_socket), "--state-dir")
        self.plugin_pid = pid_of("node", str(self.node.csi_socket), "--node-id")
        self.serial = 0

    def target(self) -> str:
        self.serial += 1
        parent = self.node.kubelet_dir / "pods" / f"pod-{self.serial}" / "volumes"
        parent = parent / "kubernetes.io~csi" / f"pv-{self.serial}"
        parent.mkdir(parents=True)
        return str(parent / "mount")

    def publish_request(self, fs_path: str, subpath: str, target: str):
        context = {"master-addrs": self.cluster.master_addrs, "fs-path": fs_path}
        return pb.NodePublishVolumeRequest(
            volume_id=f"{fs_path}/{subpath}",
            target_path=target,
            volume_capability=MOUNT,
            volume_context={**context, "subpath": subpath},
        )

    async def make_dirs(self, paths: list[str]) -> None:
        async with ClusterClient(self.cluster.master_addrs) as client:
            limiter = trio.CapacityLimiter(16)

            async def one(path: str) -> None:
                async with limiter:
                    await client.mkdirs(path)

            async with trio.open_nursery() as nursery:
                for path in paths:
                    nursery.start_soon(one, path)

    async def ready(self, call) -> None:
        """Until the plugin answers and its Probe says mountd does too."""
        with trio.fail_after(30):
            while True:
                try:
                    if (await call("Identity", "Probe", pb.ProbeRequest())).ready.value:
                        return
                except Exception:  # noqa: BLE001 - not listening yet
                    pass
                await trio.sleep(0.05)


async def timed(fn, *args) -> float:
    started = time.perf_counter()
    await fn(*args)
    return time.perf_counter() - started


async def warm_publish(bench: Bench, call, rounds: int) -> dict:
    """Rounds interleave every measure, so drift on a shared machine hits all alike."""
    await bench.make_dirs(["/warm/anchor", "/warm/vol"])
    anchor = bench.target()
    await call("Node", "NodePublishVolume", bench.publish_request("/warm", "anchor", anchor))
    mountd = bench.mountd
    samples: dict[str, list[float]] = {
        name: []
        for name in (
            "csi_publish",
            "csi_unpublish",
            "mountd_publish",
            "csi_noop_call",
            "mountd_ping",
        )
    }
    for _ in range(rounds):
        target = bench.target()
        request = bench.publish_request("/warm", "vol", target)
        samples["csi_publish"].append(await timed(call, "Node", "NodePublishVolume", request))
        undo = pb.NodeUnpublishVolumeRequest(volume_id=request.volume_id, target_path=target)
        samples["csi_unpublish"].append(await timed(call, "Node", "NodeUnpublishVolume", undo))
        # the same publish sent straight to mountd: the difference is the CSI hop
        target = bench.target()
        args = (bench.cluster.master_addrs, "/warm", "vol", "", target, False, None)
        samples["mountd_publish"].append(await timed(mountd.publish, "/warm/vol", *args))
        await mountd.unpublish("/warm/vol", target)
        # each hop alone: a CSI call the plugin answers itself, a mountd ping
        noop = pb.NodeGetCapabilitiesRequest()
        samples["csi_noop_call"].append(await timed(call, "Node", "NodeGetCapabilities", noop))
        samples["mountd_ping"].append(await timed(mountd.ping))
    undo = pb.NodeUnpublishVolumeRequest(volume_id="/warm/anchor", target_path=anchor)
    await call("Node", "NodeUnpublishVolume", undo)
    return {name: summary(values) for name, values in samples.items()}


async def cold_publish(bench: Bench, call, rounds: int) -> dict:
    await bench.make_dirs([f"/cold-{i}/vol" for i in range(rounds)])
    publish, unpublish = [], []
    for i in range(rounds):
        target = bench.target()
        request = bench.publish_request(f"/cold-{i}", "vol", target)
        publish.append(await timed(call, "Node", "NodePublishVolume", request))
        undo = pb.NodeUnpublishVolumeRequest(volume_id=request.volume_id, target_path=target)
        unpublish.append(await timed(call, "Node", "NodeUnpublishVolume", undo))
    return {"csi_publish": summary(publish), "csi_unpublish_last_ref": summary(unpublish)}


async def scale(bench: Bench, call, volumes: int, keys: int, concurrency: int) -> dict:
    layout = [(f"/scale-{i % keys}", f"v-{i}") for i in range(volumes)]
    await bench.make_dirs([f"{fs}/{sub}" for fs, sub in layout])
    requests = [bench.publish_request(fs, sub, bench.target()) for fs, sub in layout]
    limiter = trio.CapacityLimiter(concurrency)
    latencies: list[float] = []

    async def one(request) -> None:
        async with limiter:
            latencies.append(await timed(call, "Node", "NodePublishVolume", request))

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for request in requests:
            nursery.start_soon(one, request)
    wall = time.perf_counter() - started

    daemons = await bench.mountd.list()
    refs = sum(len(d["refs"]) for d in daemons)
    daemon_rss = sum(rss_kib(d["pid"]) for d in daemons if d["pid"])
    mountd_rss, node_rss = rss_kib(bench.mountd_pid), rss_kib(bench.plugin_pid)

    # one more pod on a busy node: every volume above is still mounted
    busy = []
    for i in range(20):
        request = bench.publish_request(*layout[i], bench.target())
        busy.append(await timed(call, "Node", "NodePublishVolume", request))
        undo = pb.NodeUnpublishVolumeRequest(
            volume_id=request.volume_id, target_path=request.target_path
        )
        await call("Node", "NodeUnpublishVolume", undo)

    unpublish_started = time.perf_counter()

    async def undo(request) -> None:
        async with limiter:
            await call(
                "Node",
                "NodeUnpublishVolume",
                pb.NodeUnpublishVolumeRequest(
                    volume_id=request.volume_id, target_path=request.target_path
                ),
            )

    async with trio.open_nursery() as nursery:
        for request in requests:
            nursery.start_soon(undo, request)
    unpublish_wall = time.perf_counter() - unpublish_started
    return {
        "volumes": volumes,
        "keys": keys,
        "concurrency": concurrency,
        "publish_wall_s": round(wall, 2),
        "publish_per_s": round(volumes / wall, 1),
        "publish_latency": summary(latencies),
        "warm_publish_on_busy_node": summary(busy),
        "unpublish_wall_s": round(unpublish_wall, 2),
        "daemons": len(daemons),
        "references": refs,
        "daemons_rss_mib": round(daemon_rss / 1024, 1),
        "mountd_rss_mib": round(mountd_rss / 1024, 1),
        "daemons_plus_mountd_rss_mib": round((daemon_rss + mountd_rss) / 1024, 1),
        "node_plugin_rss_mib": round(node_rss / 1024, 1),
        "daemons_after_unpublish": len(await bench.mountd.list()),
    }


async def run(bench: Bench, params: dict) -> dict:
    async with grpc_bridge.connect(str(bench.node.csi_socket)) as call:
        await bench.ready(call)
        warm = await warm_publish(bench, call, params["warm_rounds"])
        cold = await cold_publish(bench, call, params["cold_rounds"])
        scaled = await scale(bench, call, params["volumes"], params["keys"], params["concurrency"])
    return {"warm": warm, "cold": cold, "scale": scaled}


def served_seconds(stack: DevStack) -> list[float]:
    """The warm publishes' durations as the plugin logged them: what a faster client than
    this Python one (kubelet is Go) would see, less its own share of the gRPC hop."""
    (node,) = stack.nodes
    seconds = []
    for line in (stack.logs / f"{node.name}-node.log").read_text().splitlines():
        if '"msg":"call"' in line:
            call = json.loads(line)
            if call["method"] == "NodePublishVolume" and call["volume_id"] == "/warm/vol":
                seconds.append(call["duration_ms"] / 1000)
    return seconds


def table(results: dict) -> str:
    warm, cold, scaled = results["warm"], results["cold"], results["scale"]
    rows = [
        ("warm publish via CSI", warm["csi_publish"], "p99 < 20 ms"),
        ("  of it inside the plugin", warm["csi_publish_inside_plugin"], ""),
        ("warm publish via mountd", warm["mountd_publish"], ""),
        ("warm unpublish via CSI", warm["csi_unpublish"], ""),
        ("CSI hop alone (GetCaps)", warm["csi_noop_call"], ""),
        ("mountd hop alone (ping)", warm["mountd_ping"], ""),
        ("cold publish via CSI", cold["csi_publish"], "p99 < 1000 ms"),
        ("unpublish of last ref", cold["csi_unpublish_last_ref"], ""),
        ("publish under load", scaled["publish_latency"], ""),
        ("warm publish, busy node", scaled["warm_publish_on_busy_node"], ""),
    ]
    lines = [f"{'measure':<26}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'n':>6}  target"]
    for name, s, target in rows:
        lines.append(
            f"{name:<26}{s['p50_ms']:>9.2f}{s['p99_ms']:>9.2f}{s['max_ms']:>9.2f}{s['n']:>6}  "
            f"{target}"
        )
    lines.append("")
    lines.append(
        f"{scaled['volumes']} volumes over {scaled['keys']} keys, {scaled['concurrency']} at a "
        f"time: {scaled['publish_wall_s']} s ({scaled['publish_per_s']}/s; target < 15 s for "
        f"500), {scaled['daemons']} daemons (target: {scaled['keys']}), "
        f"{scaled['references']} references"
    )
    lines.append(
        f"RSS: daemons {scaled['daemons_rss_mib']} MiB + mountd {scaled['mountd_rss_mib']} MiB"
        f" = {scaled['daemons_plus_mountd_rss_mib']} MiB; node plugin "
        f"{scaled['node_plugin_rss_mib']} MiB"
    )
    lines.append(
        f"unpublish all: {scaled['unpublish_wall_s']} s; daemons left: "
        f"{scaled['daemons_after_unpublish']}"
    )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run")
    args = parser.parse_args()
    params = (
        {"warm_rounds": 20, "cold_rounds": 4, "volumes": 50, "keys": 5, "concurrency": 16}
        if args.quick
        else {"warm_rounds": 200, "cold_rounds": 20, "volumes": 500, "keys": 5, "concurrency": 16}
    )
    load_at_start = os.getloadavg()  # the machine is shared: say how busy it was
    work = Path(tempfile.mkdtemp(prefix="fusecsi-publish-"))
    stack = DevStack(work, node_names=("bench",), workers=1)
    try:
        stack.start(progress=lambda line: None)
        results = trio.run(run, Bench(stack), params)
        results["warm"]["csi_publish_inside_plugin"] = summary(served_seconds(stack))
    finally:
        stack.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(table(results))
    document = {
        "name": "publish",
        "quick": args.quick,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "kernel": platform.release(),
            "loadavg_at_start": load_at_start,
            "loadavg_at_end": os.getloadavg(),
        },
        "params": params,
        "results": results,
    }
    _results.write("publish", args.quick, document)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
