"""Everything fusecsi runs, on one machine: a cluster of the chosen engine (the embedded
master + workers by default), the CSI controller, and per simulated node a mountd + node
plugin pair, each a real subprocess on loopback TCP or unix sockets under one work directory."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import trio

from fusecsi import engines

FUSECSI = [sys.executable, "-m", "fusecsi"]


@dataclass
class Node:
    name: str
    kubelet_dir: Path
    state_dir: Path
    mountd_socket: Path
    csi_socket: Path


class DevStack:
    def __init__(
        self,
        work_dir: Path,
        node_names=("node-a", "node-b"),
        workers: int = 2,
        engine: str = engines.DEFAULT,
        backend=None,
    ) -> None:
        """`backend`: a cluster to start instead of `engines.local_cluster(engine, ...)`
        (a context manager like it; tests give the Curvine stand-ins this way)."""
        self.work_dir = work_dir
        self.logs = work_dir / "logs"
        self.workers = workers
        self.engine = engine
        self.backend = None  # the engine's local cluster (engines.local_cluster), once started
        self._given_backend = backend
        self.controller_socket = work_dir / "controller" / "csi.sock"
        self.nodes = [
            Node(
                name=name,
                kubelet_dir=work_dir / name / "kubelet",
                state_dir=work_dir / name / "mountd",
                mountd_socket=work_dir / name / "mountd.sock",
                csi_socket=work_dir / name / "csi.sock",
            )
            for name in node_names
        ]
        self._procs: list[tuple[str, subprocess.Popen]] = []

    @property
    def cluster(self):
        """The embedded engine's LocalCluster (benchmarks and tests of that engine use it)."""
        return getattr(self.backend, "cluster", None)

    @property
    def master_addrs(self) -> str:
        assert self.cluster is not None
        return self.cluster.master_addrs

    @property
    def parameters(self) -> dict[str, str]:
        """The StorageClass parameters that name this stack's cluster (with `engine`)."""
        return {"engine": self.engine, **self.backend.parameters}

    @property
    def secrets(self) -> dict[str, str]:
        """The CSI secret a StorageClass of this stack's cluster refers to."""
        return dict(self.backend.secrets)

    def _spawn(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen(
            [*FUSECSI, *args], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        self._procs.append((name, proc))
        return proc

    def _wait_for(self, path: Path, proc: subprocess.Popen, name: str, timeout=30.0) -> None:
        deadline = time.monotonic() + timeout
        while not path.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}; see {self.logs}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not create {path} within {timeout}s")
            time.sleep(0.02)

    def start(self, progress=print) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        backend = self._given_backend
        if backend is None:
            backend = engines.local_cluster(self.engine, self.work_dir / "cluster", self.workers)
        backend.__enter__()
        self.backend = backend
        progress(f"cluster ({self.engine}): {backend.describe()}")
        controller = self._spawn(
            "controller", "controller", "--endpoint", f"unix://{self.controller_socket}"
        )
        self._wait_for(self.controller_socket, controller, "controller")
        progress(f"controller: CSI Identity + Controller on {self.controller_socket}")
        for node in self.nodes:
            share_like_kubelet(node.kubelet_dir)
            mountd = self._spawn(
                f"{node.name}-mountd",
                "mountd",
                "--state-dir",
                str(node.state_dir),
                "--socket",
                f"unix://{node.mountd_socket}",
                "--kubelet-dir",
                str(node.kubelet_dir),
                "--linger",
                "0",
            )
            self._wait_for(node.mountd_socket, mountd, f"{node.name} mountd")
            plugin = self._spawn(
                f"{node.name}-node",
                "node",
                "--endpoint",
                f"unix://{node.csi_socket}",
                "--node-id",
                node.name,
                "--mountd",
                f"unix://{node.mountd_socket}",
            )
            self._wait_for(node.csi_socket, plugin, f"{node.name} node plugin")
            progress(
                f"{node.name}: mountd on {node.mountd_socket}, CSI Node on {node.csi_socket}, "
                f"kubelet dir {node.kubelet_dir}"
            )

    def stop(self) -> None:
        """Stop every role (SIGTERM, then SIGKILL), then whatever FUSE daemons and mounts a
        failed run may have left under the work directory."""
        for _, proc in reversed(self._procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _, proc in reversed(self._procs):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self._procs.clear()
        for mountpoint in leftover_mounts(self.work_dir):
            subprocess.run(["umount", "-l", mountpoint], check=False, capture_output=True)
        kill_daemons_under(self.work_dir)
        if self.backend is not None:
            self.backend.__exit__(None, None, None)
            self.backend = None


def share_like_kubelet(kubelet_dir: Path) -> None:
    """Make `kubelet_dir` a shared mount, as kubelet does with its root dir, so that binds
    made under it reach containers that hold HostToContainer (slave) copies of them."""
    kubelet_dir.mkdir(parents=True, exist_ok=True)
    for args in (["--bind", kubelet_dir, kubelet_dir], ["--make-rshared", kubelet_dir]):
        subprocess.run(["mount", *map(str, args)], check=True, capture_output=True)


CONTAINER_LOOP = r"""
import errno, os, sys, time
data, name, interval = sys.argv[1], sys.argv[2], float(sys.argv[3])
n = 0
while True:
    n += 1
    try:
        # every round reopens only its files, through the path the container was given
        path = os.path.join(data, name)
        with open(path, "w") as f:
            f.write(str(n))
        with open(path) as f:
            ok = f.read() == str(n)
        print("ok" if ok else "err EBADMSG", time.monotonic(), flush=True)
    except OSError as exc:
        print("err", errno.errorcode.get(exc.errno, "?"), time.monotonic(), flush=True)
    time.sleep(interval)
"""


class Container:
    """A process that sees a target the way a runc container with `mountPropagation:
    HostToContainer` does: in its own mount namespace whose mounts are slaves of the host's,
    with the target bind-mounted at another path (its "/data") as a slave too. It writes and
    reads a file through that path every `interval` seconds and reports each round.

    Only mounts stacked on the target reach it; a target unmounted and bound afresh on the
    host never does (the container keeps the dead mount).
    """

    def __init__(self, target: Path, data: Path, name: str, interval: float = 0.05) -> None:
        self.target, self.data, self.name, self.interval = target, data, name, interval
        self.rounds: list[tuple[bool, str, float]] = []  # (ok, errno name, monotonic time)
        self._changed = trio.Event()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled (start it with `nursery.start`: returns after its first round)."""
        self.data.mkdir(parents=True, exist_ok=True)
        script = (
            'mount --make-rslave / && mount --bind "$1" "$2" && mount --make-rslave "$2" '
            '&& exec "$3" -c "$4" "$2" "$5" "$6"'
        )
        args = [str(self.target), str(self.data), sys.executable, CONTAINER_LOOP, self.name]
        argv = ["unshare", "--mount", "--propagation", "unchanged", "sh", "-euc", script, "sh"]
        proc = await trio.lowlevel.open_process(
            [*argv, *args, str(self.interval)], stdout=subprocess.PIPE
        )
        started = False
        try:
            buffer = b""
            while chunk := await proc.stdout.receive_some():
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    word, *rest = line.decode().split()
                    self.rounds.append(
                        (word == "ok", rest[0] if len(rest) > 1 else "", float(rest[-1]))
                    )
                self._changed.set()
                self._changed = trio.Event()
                if not started:
                    started = True
                    task_status.started()
            # OSError: the walkthrough reports it as the scenario's failure
            raise OSError(f"container process exited {await proc.wait()}")
        finally:
            with trio.CancelScope(shield=True):
                proc.kill()
                await proc.wait()

    async def wait_for(self, predicate) -> None:
        while not predicate(self.rounds):
            await self._changed.wait()

    async def outage(self, since: float) -> float:
        """Wait until the container's I/O works again after `since` (a kill); the seconds it
        saw no I/O: from its first failed round to the first good one after it, or, when the
        replacement daemon took over the connection and nothing failed, the stall between
        the last round before `since` and the first one after it."""

        def recovered(rounds) -> bool:
            later = [r for r in rounds if r[2] > since]
            first_bad = next((i for i, r in enumerate(later) if not r[0]), None)
            if first_bad is None:
                return bool(later)
            return any(r[0] for r in later[first_bad:])

        await self.wait_for(recovered)
        later = [r for r in self.rounds if r[2] > since]
        bad = next((r for r in later if not r[0]), None)
        if bad is None:
            before = [r[2] for r in self.rounds if r[2] <= since]
            return later[0][2] - (before[-1] if before else since)
        good = next(r for r in later if r[0] and r[2] > bad[2])
        return good[2] - bad[2]


def leftover_mounts(under: Path) -> list[str]:
    """Mount points below `under`, deepest first (from /proc/self/mountinfo)."""
    prefix = str(under.resolve()) + "/"
    found = []
    with open("/proc/self/mountinfo") as table:
        for line in table:
            mountpoint = line.split()[4].encode().decode("unicode_escape")
            if mountpoint.startswith(prefix):
                found.append(mountpoint)
    return sorted(found, key=len, reverse=True)


# programs besides fusecsi a stack runs: the engines' servers and FUSE daemons
ENGINE_PROGRAMS = (b"juicefs", b"weed", b"redis-server", b"curvine-fuse")


def processes_under(under: Path, role: bytes = b"") -> list[int]:
    """Pids of fusecsi processes (of `role`, e.g. b"mount", when given) and engine programs
    whose command line names a path below `under`: everything a stack in that work
    directory runs (not this process: `fusecsi dev --work-dir` names it too)."""
    needle = str(under.resolve()).encode()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            program = os.path.basename(cmdline.split(b"\0", 1)[0])
            ours = b"fusecsi" in cmdline or program in ENGINE_PROGRAMS
            if ours and needle in cmdline:
                if not role or b"\0" + role + b"\0" in cmdline:
                    found.append(int(pid))
    return found


def kill_daemons_under(under: Path) -> None:
    for pid in processes_under(under, b"mount"):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def stop_everything_under(under: Path, grace: float = 10.0) -> int:
    """Stop a stack left running (`fusecsi dev --keep-running`): SIGTERM to every process,
    SIGKILL to those still there after `grace`, then unmount what is left. How many
    processes there were."""
    pids = processes_under(under)
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") for p in pids):
        time.sleep(0.05)
    for pid in processes_under(under):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    for mountpoint in leftover_mounts(under):
        subprocess.run(["umount", "-l", mountpoint], check=False, capture_output=True)
    return len(pids)
