"""How fast a pod gets its volume, per engine: NodePublishVolume as kubelet sees it, and how
long a pod's mount is gone when its FUSE daemon dies.

    python benchmarks/publish.py                       # every engine that runs here
    python benchmarks/publish.py --quick               # short smoke run
    python benchmarks/publish.py --engine embedded --engine juicefs
    python benchmarks/publish.py --engines embedded,seaweedfs --quick

Per engine, one after the other, real processes on this machine: the engine's local cluster
(`fusecsi.engines.local_cluster`: embedded master + one worker; JuiceFS on redis-server or
SQLite with a local bucket; SeaweedFS weed master/volume/filer), `fusecsi controller`,
`fusecsi mountd` (linger 0) and `fusecsi node`. Directories are made through the engine's
Namespace (what the controller uses). Measures, through the CSI socket:
- warm publish: the key's FUSE daemon already runs (another target holds it), so a publish
  is a bind mount plus bookkeeping;
- cold publish: a key nobody uses yet, so mountd starts the engine's FUSE daemon first;
- recovery: SIGKILL the key's daemon (its pid from mountd's list) and time until a statfs
  through the pod's target answers again (mountd starts a new daemon and puts it back);
- scale: many volumes over a few keys published concurrently (as kubelet starts pods):
  wall time, throughput, daemon count, and the resident memory of daemons and mountd;
and, to split the CSI hop from mountd's own work, warm publishes sent straight to mountd.
Prints one table with a column per engine and each engine's ratio to the embedded one.
Targets (embedded): warm p99 < 20 ms, cold p99 < 1 s, 500 volumes over 5 keys in < 15 s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import _results  # noqa: E402 - benchmarks/ is on sys.path when run

from fusecsi import engines  # noqa: E402
from fusecsi.csi import bridge as grpc_bridge  # noqa: E402
from fusecsi.csi.generated import csi_pb2 as pb  # noqa: E402
from fusecsi.dev.stack import DevStack  # noqa: E402
from fusecsi.mountd.client import MountdClient  # noqa: E402
from fusecsi.mountd.recovery import CRASH_WINDOW  # noqa: E402

ENGINES = ("embedded", "juicefs", "seaweedfs")  # those with a local cluster that runs here
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
    if not samples:
        return {"p50_ms": None, "p99_ms": None, "mean_ms": None, "max_ms": None, "n": 0}
    ms = [s * 1000 for s in samples]
    return {
        "p50_ms": round(percentile(ms, 50), 2),
        "p99_ms": round(percentile(ms, 99), 2),
        "mean_ms": round(statistics.fmean(ms), 2),
        "max_ms": round(max(ms), 2),
        "n": len(ms),
    }


def status_kib(pid: int, field: str = "VmRSS") -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def gone(pid: int) -> bool:
    """Dead: no such process, or a zombie its parent (mountd) has not reaped yet."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] in "ZX"


def statfs_answers(path: str) -> bool:
    try:
        os.statvfs(path)
    except OSError:
        return False
    return True


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
    """One simulated node of `fusecsi dev`'s stack (mountd with linger 0, node plugin) on
    one engine's cluster."""

    def __init__(self, stack: DevStack) -> None:
        self.stack = stack
        self.engine = stack.engine
        (self.node,) = stack.nodes
        self.parameters = stack.parameters  # what a StorageClass holds (with `engine`)
        self.secrets = stack.secrets  # its CSI secret
        self.cluster = engines.node_engine(self.engine).parse_cluster(self.parameters, self.secrets)
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
        """A static PV's publish: the StorageClass parameters, fs-path and subpath."""
        context = {**self.parameters, "fs-path": fs_path, "subpath": subpath}
        return pb.NodePublishVolumeRequest(
            volume_id=f"{fs_path}/{subpath}",
            target_path=target,
            volume_capability=MOUNT,
            volume_context=context,
            secrets=self.secrets,
        )

    async def mountd_publish(self, fs_path: str, subpath: str, target: str) -> None:
        """The publish the node plugin would forward, sent straight to mountd."""
        await self.mountd.publish(
            volume_id=f"{fs_path}/{subpath}",
            engine=self.engine,
            cluster=self.cluster.address,
            fs_path=fs_path,
            subpath=subpath,
            target=target,
            readonly=False,
            secrets=dict(self.cluster.secrets),
        )

    async def make_dirs(self, paths: list[str]) -> None:
        """Through the engine's Namespace, as the controller makes volumes."""
        async with engines.open_namespace(self.cluster, timeout=30) as namespace:
            limiter = trio.CapacityLimiter(16)

            async def one(path: str) -> None:
                async with limiter:
                    await namespace.mkdirs(path)

            async with trio.open_nursery() as nursery:
                for path in paths:
                    nursery.start_soon(one, path)

    async def daemon_of(self, target: str) -> dict | None:
        for daemon in await self.mountd.list():
            if any(ref["target"] == target for ref in daemon["refs"]):
                return daemon
        return None

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
    names = ("csi_publish", "csi_unpublish", "mountd_publish", "csi_noop_call", "mountd_ping")
    samples: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(rounds):
        target = bench.target()
        request = bench.publish_request("/warm", "vol", target)
        samples["csi_publish"].append(await timed(call, "Node", "NodePublishVolume", request))
        undo = pb.NodeUnpublishVolumeRequest(volume_id=request.volume_id, target_path=target)
        samples["csi_unpublish"].append(await timed(call, "Node", "NodeUnpublishVolume", undo))
        # the same publish sent straight to mountd: the difference is the CSI hop
        target = bench.target()
        samples["mountd_publish"].append(await timed(bench.mountd_publish, "/warm", "vol", target))
        await mountd.unpublish("/warm/vol", target)
        # each hop alone: a CSI call the plugin answers itself, a mountd ping
        noop = pb.NodeGetCapabilitiesRequest()
        samples["csi_noop_call"].append(await timed(call, "Node", "NodeGetCapabilities", noop))
        samples["mountd_ping"].append(await timed(mountd.ping))
    out: dict = {name: summary(values) for name, values in samples.items()}
    # one daemon's memory, with one volume published through it
    daemon = await bench.daemon_of(anchor)
    pid = daemon["pid"] if daemon else None
    out["daemon_rss_mib"] = round(status_kib(pid) / 1024, 1) if pid else None
    out["daemon_peak_rss_mib"] = round(status_kib(pid, "VmHWM") / 1024, 1) if pid else None
    undo = pb.NodeUnpublishVolumeRequest(volume_id="/warm/anchor", target_path=anchor)
    await call("Node", "NodeUnpublishVolume", undo)
    return out


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


async def recovery(bench: Bench, call, kills: int) -> dict:
    """SIGKILL the daemon behind a published target `kills` times; each time, the seconds
    from the kill until a statfs through the target answers again. Every kill hits a daemon
    that has run longer than mountd's crash window: one that dies sooner counts as a crash
    loop and its replacement waits out a backoff (that is a policy, not recovery speed)."""
    await bench.make_dirs(["/recovery/vol"])
    target = bench.target()
    await call("Node", "NodePublishVolume", bench.publish_request("/recovery", "vol", target))
    samples: list[float] = []
    restarts = 0
    running_since = trio.current_time()
    for _ in range(kills):
        await trio.sleep_until(running_since + CRASH_WINDOW + 0.5)
        daemon = await bench.daemon_of(target)
        if daemon is None or not daemon["pid"]:
            raise RuntimeError(f"mountd lists no daemon for {target}")
        pid = daemon["pid"]
        started = time.perf_counter()
        os.kill(pid, signal.SIGKILL)
        with trio.fail_after(120):
            while True:  # until it is gone an answer may still come from the old daemon
                if gone(pid):
                    break
                await trio.sleep(0.001)
            while True:  # a statfs may block until a new daemon serves the kept connection
                if await trio.to_thread.run_sync(statfs_answers, target, abandon_on_cancel=True):
                    break
                await trio.sleep(0.005)
        samples.append(time.perf_counter() - started)
        with trio.fail_after(120):
            while True:
                daemon = await bench.daemon_of(target)
                if daemon and daemon["pid"] not in (None, pid) and daemon["state"] == "running":
                    restarts = daemon["restarts"]
                    running_since = trio.current_time()
                    break
                await trio.sleep(0.02)
    undo = pb.NodeUnpublishVolumeRequest(volume_id="/recovery/vol", target_path=target)
    await call("Node", "NodeUnpublishVolume", undo)
    return {"statfs_back": summary(samples), "restarts_counted": restarts}


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
    daemon_rss = sum(status_kib(d["pid"]) for d in daemons if d["pid"])
    mountd_rss, node_rss = status_kib(bench.mountd_pid), status_kib(bench.plugin_pid)

    # one more pod on a busy node: every volume above is still mounted
    busy = []
    for i in range(min(20, volumes)):
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
        recovered = await recovery(bench, call, params["kills"])
        scaled = await scale(bench, call, params["volumes"], params["keys"], params["concurrency"])
    return {"warm": warm, "cold": cold, "recovery": recovered, "scale": scaled}


def served_seconds(stack: DevStack) -> list[float]:
    """The warm publishes' durations as the plugin logged them: what a faster client than
    this Python one (kubelet is Go) would see, less its own share of the gRPC hop."""
    (node,) = stack.nodes
    seconds = []
    for line in (stack.logs / f"{node.name}-node.log").read_text().splitlines():
        if '"msg":"call"' in line:
            call = json.loads(line)
            if call.get("method") == "NodePublishVolume" and call.get("volume_id") == "/warm/vol":
                seconds.append(call["duration_ms"] / 1000)
    return seconds


def measure_engine(engine: str, params: dict) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"fusecsi-publish-{engine}-"))
    stack = DevStack(work, node_names=("bench",), workers=1, engine=engine)
    try:
        stack.start(progress=lambda line: None)
        results = trio.run(run, Bench(stack), params)
        results["warm"]["csi_publish_inside_plugin"] = summary(served_seconds(stack))
        return results
    finally:
        stack.stop()
        shutil.rmtree(work, ignore_errors=True)


# (label, path into one engine's results, target); a path ending in a summary is shown
# as p50 / p99 (recovery: and max)
ROWS = [
    ("warm publish via CSI", ("warm", "csi_publish"), "p99 < 20 ms"),
    ("  of it inside the plugin", ("warm", "csi_publish_inside_plugin"), ""),
    ("warm publish via mountd", ("warm", "mountd_publish"), ""),
    ("warm unpublish via CSI", ("warm", "csi_unpublish"), ""),
    ("CSI hop alone (GetCaps)", ("warm", "csi_noop_call"), ""),
    ("mountd hop alone (ping)", ("warm", "mountd_ping"), ""),
    ("cold publish via CSI", ("cold", "csi_publish"), "p99 < 1000 ms"),
    ("unpublish of last ref", ("cold", "csi_unpublish_last_ref"), ""),
    ("recovery: kill to statfs", ("recovery", "statfs_back"), ""),
    ("publish under load", ("scale", "publish_latency"), ""),
    ("warm publish, busy node", ("scale", "warm_publish_on_busy_node"), ""),
]
SCALARS = [
    ("daemon RSS, 1 volume (MiB)", ("warm", "daemon_rss_mib")),
    ("daemon peak RSS (MiB)", ("warm", "daemon_peak_rss_mib")),
    ("scale: wall time (s)", ("scale", "publish_wall_s")),
    ("scale: publishes/s", ("scale", "publish_per_s")),
    ("scale: daemons", ("scale", "daemons")),
    ("scale: daemons RSS (MiB)", ("scale", "daemons_rss_mib")),
    ("scale: mountd RSS (MiB)", ("scale", "mountd_rss_mib")),
    ("scale: unpublish all (s)", ("scale", "unpublish_wall_s")),
    ("scale: daemons left", ("scale", "daemons_after_unpublish")),
]


def lookup(results: dict, path: tuple[str, ...]):
    for key in path:
        results = results.get(key) if isinstance(results, dict) else None
    return results


def ratio(ours, base) -> str:
    return f"{ours / base:.2f}x" if isinstance(ours, int | float) and base else "-"


def ratios(by_engine: dict) -> dict:
    """Each engine's value over the embedded engine's: p50 and p99 of every summary row,
    and every scalar."""
    base = by_engine.get("embedded")
    out: dict[str, dict] = {}
    if base is None:
        return out
    for engine, results in by_engine.items():
        if engine == "embedded":
            continue
        mine: dict[str, float] = {}
        for _, path, _ in ROWS:
            for stat in ("p50_ms", "p99_ms"):
                ours = lookup(results, (*path, stat))
                theirs = lookup(base, (*path, stat))
                if isinstance(ours, int | float) and theirs:
                    mine[f"{'/'.join(path)}/{stat}"] = round(ours / theirs, 2)
        for _, path in SCALARS:
            ours, theirs = lookup(results, path), lookup(base, path)
            if isinstance(ours, int | float) and theirs:
                mine["/".join(path)] = round(ours / theirs, 2)
        out[engine] = mine
    return out


def headline(by_engine: dict) -> dict:
    """The few figures per engine that run_all.py charts (the JSON's "summary")."""
    picks = {
        "warm_publish_p99_ms": ("warm", "csi_publish", "p99_ms"),
        "cold_publish_p99_ms": ("cold", "csi_publish", "p99_ms"),
        "recovery_p50_ms": ("recovery", "statfs_back", "p50_ms"),
        "recovery_p99_ms": ("recovery", "statfs_back", "p99_ms"),
        "daemon_rss_mib": ("warm", "daemon_rss_mib"),
    }
    return {
        engine: {name: lookup(results, path) for name, path in picks.items()}
        for engine, results in by_engine.items()
    }


def table(by_engine: dict) -> str:
    names = list(by_engine)
    others = [n for n in names if n != "embedded"] if "embedded" in names else []
    head = ["measure (p50 / p99 ms)", *names, *(f"{n}/embedded p99" for n in others), "target"]
    rows = [head]
    for label, path, target in ROWS:
        row = [label]
        for name in names:
            s = lookup(by_engine[name], path) or {}
            if s.get("n"):
                text = f"{s['p50_ms']:.1f} / {s['p99_ms']:.1f}"
                if path[0] == "recovery":
                    text += f" (max {s['max_ms']:.0f})"
                row.append(text)
            else:
                row.append("-")
        for name in others:
            row.append(
                ratio(
                    lookup(by_engine[name], (*path, "p99_ms")),
                    lookup(by_engine["embedded"], (*path, "p99_ms")),
                )
            )
        rows.append([*row, target])
    for label, path in SCALARS:
        row = [label, *(str(lookup(by_engine[n], path)) for n in names)]
        for name in others:
            row.append(ratio(lookup(by_engine[name], path), lookup(by_engine["embedded"], path)))
        rows.append([*row, ""])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def parse_engines(args) -> list[str]:
    chosen: list[str] = []
    for item in [*(args.engine or []), *(args.engines.split(",") if args.engines else [])]:
        name = item.strip()
        if name and name not in chosen:
            chosen.append(name)
    for name in chosen:
        if name not in engines.NAMES:
            raise SystemExit(f"unknown engine {name!r} (known: {', '.join(engines.NAMES)})")
    return chosen or list(ENGINES)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run")
    parser.add_argument("--engine", action="append", help="an engine to measure (repeatable)")
    parser.add_argument("--engines", help=f"comma-separated engines (default {','.join(ENGINES)})")
    parser.add_argument("--kills", type=int, help="daemon kills for recovery (10, quick 3)")
    args = parser.parse_args()
    chosen = parse_engines(args)
    if os.geteuid() != 0:
        raise SystemExit("needs root (FUSE mounts, bind mounts)")
    params = (
        {"warm_rounds": 20, "cold_rounds": 4, "kills": 3, "volumes": 50, "keys": 5}
        if args.quick
        else {"warm_rounds": 200, "cold_rounds": 20, "kills": 10, "volumes": 500, "keys": 5}
    )
    params["concurrency"] = 16
    if args.kills:
        params["kills"] = args.kills
    load_at_start = os.getloadavg()  # the machine is shared: say how busy it was
    by_engine: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    for engine in chosen:
        print(f"==> {engine}", flush=True)
        started = time.monotonic()
        try:
            by_engine[engine] = measure_engine(engine, params)
        except (engines.BadParameter, FileNotFoundError) as exc:  # cannot run here
            skipped[engine] = str(exc).splitlines()[0]
            print(f"    skipped: {skipped[engine]}", flush=True)
            continue
        print(f"    {engine} took {time.monotonic() - started:.0f}s", flush=True)
    if not by_engine:
        raise SystemExit("no engine could run here")
    print()
    print(table(by_engine))
    for engine, results in by_engine.items():
        s = results["scale"]
        print(
            f"{engine}: {s['volumes']} volumes over {s['keys']} keys, {s['concurrency']} at a "
            f"time: {s['publish_wall_s']} s, {s['daemons']} daemons, {s['references']} refs"
        )
    for engine, reason in skipped.items():
        print(f"{engine}: skipped ({reason})")
    load_at_end = os.getloadavg()
    print(f"load average: {load_at_start[0]:.1f} at start, {load_at_end[0]:.1f} at the end")
    document = {
        "name": "publish",
        "quick": args.quick,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "kernel": platform.release(),
            "loadavg_at_start": load_at_start,
            "loadavg_at_end": load_at_end,
        },
        "params": {**params, "engines": chosen},
        "skipped": skipped,
        "summary": headline(by_engine),
        "results": by_engine,
        "ratios_vs_embedded": ratios(by_engine),
    }
    _results.write("publish", args.quick, document)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
