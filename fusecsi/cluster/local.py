"""A master and workers as subprocesses on loopback, for tests and `fusecsi dev`.

    with LocalCluster(tmp_path, workers=2) as cluster:
        async with ClusterClient(cluster.master_addrs) as client: ...

The token (if any) reaches the children through the environment, never their arguments.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from fusecsi.rpc.blocking import call_sync
from fusecsi.rpc.errors import RPCError

STARTUP_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    def __init__(
        self,
        base_dir: str | os.PathLike,
        workers: int = 2,
        token: str | None = None,
        *,
        replication: int = 1,
        block_size: int | None = None,
        master_args: tuple[str, ...] = (),
        worker_args: tuple[str, ...] = (),
        worker_capacity: int | None = None,
        log_level: str = "INFO",
        short_circuit: bool = True,
    ) -> None:
        self.base = Path(base_dir)
        self.token = token
        self.replication = replication
        self.block_size = block_size
        self.master_args = tuple(master_args)
        self.worker_args = tuple(worker_args)  # given to every worker
        self.worker_capacity = worker_capacity
        # workers hand block files to clients on this host through <data-dir>/worker.sock
        self.short_circuit = short_circuit
        self.log_level = log_level
        self.master_port = free_port()
        self.master_addrs = f"127.0.0.1:{self.master_port}"
        self.worker_ports = [free_port() for _ in range(workers)]
        self.master: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen | None] = [None] * workers
        self._logs: list = []

    # ------------------------------------------------------------ processes

    def _env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if k != "FUSECSI_TOKEN"}
        if self.token is not None:
            env["FUSECSI_TOKEN"] = self.token
        return env

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log_dir = self.base / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        log = open(log_dir / f"{name}.log", "ab")  # noqa: SIM115 (owned by the cluster)
        self._logs.append(log)
        return subprocess.Popen(
            [sys.executable, "-m", "fusecsi", *args, "--log-level", self.log_level],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self._env(),
            start_new_session=True,
        )

    def log_text(self, name: str) -> str:
        path = self.base / "logs" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start_master(self) -> None:
        args = [
            "master",
            "--listen",
            self.master_addrs,
            "--data-dir",
            str(self.base / "master"),
            "--replication",
            str(self.replication),
            *self.master_args,
        ]
        if self.block_size:
            args += ["--block-size", str(self.block_size)]
        self.master = self._spawn("master", args)
        self._wait(lambda: self._info() is not None, "master", self.master)

    def start_worker(self, i: int) -> None:
        args = [
            "worker",
            "--master-addrs",
            self.master_addrs,
            "--listen",
            f"127.0.0.1:{self.worker_ports[i]}",
            "--data-dir",
            str(self.base / f"worker{i}"),
        ]
        if not self.short_circuit:
            args += ["--local-socket", ""]
        if self.worker_capacity:
            args += ["--capacity", str(self.worker_capacity)]
        args += self.worker_args
        self.workers[i] = self._spawn(f"worker{i}", args)
        address = f"127.0.0.1:{self.worker_ports[i]}"
        proc = self.workers[i]
        # the worker answers, and the master has heard from this very process
        self._wait(lambda: self._registered(address, proc.pid), f"worker{i}", proc)

    def _info(self) -> dict | None:
        try:
            return call_sync(self.master_addrs, "cluster_info", token=self.token, timeout=2)
        except (RPCError, OSError):
            return None

    def _registered(self, address: str, pid: int) -> bool:
        try:
            info = call_sync(address, "worker_info", token=self.token, timeout=2)
        except (RPCError, OSError):
            return False
        return info.get("pid") == pid and info.get("registered") and address in self.live_workers()

    def live_workers(self) -> list[str]:
        info = self._info()
        return [w["address"] for w in info["workers"] if w["live"]] if info else []

    def _wait(self, ready, name: str, proc: subprocess.Popen) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not ready():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log_text(name)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not become ready:\n{self.log_text(name)}")
            time.sleep(0.05)

    def start(self) -> LocalCluster:
        self.start_master()
        for i in range(len(self.workers)):
            self.start_worker(i)
        return self

    @staticmethod
    def _end(proc: subprocess.Popen | None, sig: int) -> None:
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def stop_worker(self, i: int) -> None:
        self._end(self.workers[i], signal.SIGTERM)
        self.workers[i] = None

    def kill_worker(self, i: int) -> None:
        self._end(self.workers[i], signal.SIGKILL)
        self.workers[i] = None

    def stop_master(self) -> None:
        self._end(self.master, signal.SIGTERM)
        self.master = None

    def kill_master(self) -> None:
        self._end(self.master, signal.SIGKILL)
        self.master = None

    def restart_master(self) -> None:
        """Start the master again (after stop_master/kill_master) and wait for the workers."""
        self.stop_master()
        self.start_master()
        wanted = {
            f"127.0.0.1:{p}" for p, w in zip(self.worker_ports, self.workers, strict=True) if w
        }
        self._wait(lambda: wanted <= set(self.live_workers()), "master", self.master)

    def stop(self) -> None:
        for i in range(len(self.workers)):
            self.stop_worker(i)
        self.stop_master()
        for log in self._logs:
            log.close()
        self._logs.clear()

    def __enter__(self) -> LocalCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc_info) -> None:
        self.stop()
