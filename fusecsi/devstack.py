"""Everything fusecsi runs, on one machine: a cluster (master + workers), the CSI controller,
and per simulated node a mountd + node plugin pair, each a real subprocess on loopback TCP or
unix sockets under one work directory."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fusecsi.cluster.local import LocalCluster

FUSECSI = [sys.executable, "-m", "fusecsi"]


@dataclass
class Node:
    name: str
    kubelet_dir: Path
    state_dir: Path
    mountd_socket: Path
    csi_socket: Path


class DevStack:
    def __init__(self, work_dir: Path, node_names=("node-a", "node-b"), workers: int = 2) -> None:
        self.work_dir = work_dir
        self.logs = work_dir / "logs"
        self.workers = workers
        self.cluster: LocalCluster | None = None
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
    def master_addrs(self) -> str:
        assert self.cluster is not None
        return self.cluster.master_addrs

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
        self.cluster = LocalCluster(self.work_dir / "cluster", workers=self.workers)
        self.cluster.__enter__()
        progress(f"cluster: master and {self.workers} workers at {self.master_addrs}")
        controller = self._spawn(
            "controller", "controller", "--endpoint", f"unix://{self.controller_socket}"
        )
        self._wait_for(self.controller_socket, controller, "controller")
        progress(f"controller: CSI Identity + Controller on {self.controller_socket}")
        for node in self.nodes:
            node.kubelet_dir.mkdir(parents=True, exist_ok=True)
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
        if self.cluster is not None:
            self.cluster.__exit__(None, None, None)
            self.cluster = None


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


def kill_daemons_under(under: Path) -> None:
    needle = str(under.resolve()).encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"fusecsi" in cmdline and b"\0mount\0" in cmdline and needle in cmdline:
                os.kill(int(pid), signal.SIGKILL)
