"""Helpers for the FUSE tests: a `fusecsi mount` daemon as a subprocess, mount checks,
and cluster calls from synchronous test code."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import trio

from fusecsi import mount_options
from fusecsi.cluster.client import ClusterClient
from fusecsi.fuse import kernel, takeover
from fusecsi.mountd.daemons import leader_exited

READY_TIMEOUT = 30
MiB = 1 << 20


def block(i: int) -> bytes:
    """1 MiB of content distinct for every `i`."""
    return hashlib.sha256(b"%d" % i).digest() * (MiB // 32)


def mounted(path: str) -> bool:
    parent, name = os.path.split(os.path.abspath(path))  # never stat the mount itself
    target = os.path.join(os.path.realpath(parent), name)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


class Mount:
    """One `fusecsi mount` daemon."""

    def __init__(
        self, master_addrs: str, fs_path: str, mountpoint: Path, options: str = "", env=None
    ):
        self.master_addrs = master_addrs
        self.fs_path = fs_path
        self.path = mountpoint
        self.options = options
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.log = mountpoint.parent / f"{mountpoint.name}.log"

    def start(self) -> Mount:
        if not mounted(str(self.path)):  # a kept connection answers only once served
            self.path.mkdir(parents=True, exist_ok=True)
        read_end, write_end = os.pipe()
        cmd = [sys.executable, "-m", "fusecsi", "mount", "--master-addrs", self.master_addrs]
        cmd += ["--fs-path", self.fs_path, "--ready-fd", str(write_end), str(self.path)]
        if self.options:
            cmd[4:4] = ["--options", self.options]
        cmd[4:4], fds = self.connection_args()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, pass_fds=(write_end, *fds), stderr=log, stdout=log, env=self.env
            )
        os.close(write_end)
        try:
            self.ready = _read_all(read_end, READY_TIMEOUT)
        finally:
            os.close(read_end)
        if self.ready != b"READY\n":
            self.stop()
            raise RuntimeError(f"mount did not come up: {self.ready!r}\n{self.log_text()}")
        return self

    def connection_args(self) -> tuple[list[str], tuple]:
        return [], ()

    def kill(self) -> None:
        """SIGKILL the daemon and remove its mount: a crash, before a fresh mount."""
        self.proc.send_signal(signal.SIGKILL)
        self.wait_dead()
        cleanup_mount(self.path)

    def wait_dead(self, seconds: float = 30) -> None:
        """Until the daemon's main thread is gone (a thread stuck in the kernel on the mount
        may wait for the next daemon: see mountd's daemons.leader_exited)."""
        deadline = time.monotonic() + seconds
        while not leader_exited(self.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.01)

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        code = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                code = self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                code = self.proc.wait()
        elif self.proc is not None:
            code = self.proc.returncode
        cleanup_mount(self.path)
        return code

    def __truediv__(self, other: str) -> Path:
        return self.path / other


class KeptMount(Mount):
    """A mount whose /dev/fuse descriptor the test process keeps, as mountd does: its daemon
    can die and a new one take the same connection over (fusecsi/fuse/takeover.py). The
    test process must hold no file on the mount while it starts a daemon (the child would
    flush it on exec, waiting for the daemon it is about to become)."""

    fd: int | None = None

    def connection_args(self) -> tuple[list[str], tuple]:
        conn = str(self.path) + ".conn"
        if self.fd is None:
            options = kernel.fuse_options(
                self.master_addrs, self.fs_path, mount_options.parse_arg(self.options)
            )
            source = kernel.fsname(self.master_addrs, self.fs_path)
            self.fd = takeover.mount(str(self.path), source, "fuse.fusecsi", options, conn)
        return ["--fuse-fd", str(self.fd), "--connection", conn], (self.fd,)

    def replace(self, sig: int = signal.SIGKILL) -> None:
        """Stop the daemon with `sig` and start another on the same connection, once its main
        thread is gone (a thread stuck on the mount may wait for the next daemon)."""
        self.proc.send_signal(sig)
        self.wait_dead()
        self.start()

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        code = super().stop(sig)
        self._drop()
        return code

    def kill(self) -> None:
        super().kill()
        self._drop()

    def _drop(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class MountSet:
    """The mounts one test makes: `mounts(fs_path, options, name=...)`; `close()` stops all."""

    def __init__(self, master_addrs: str, base_dir: Path) -> None:
        self.master_addrs = master_addrs
        self.base_dir = base_dir
        self.mounts: list[Mount] = []

    def __call__(
        self, fs_path: str, options: str = "", name=None, where=None, env=None, kept=False
    ):
        where = where or self.base_dir / (name or f"mnt{len(self.mounts)}")
        m = (KeptMount if kept else Mount)(self.master_addrs, fs_path, where, options, env=env)
        self.mounts.append(m)
        return m.start()

    def close(self) -> None:
        for m in self.mounts:
            m.stop()


def drop_kernel_caches() -> None:
    """The kernel forgets its dentries and inodes: names reach the daemon again, and it gets
    a FORGET for every inode it handed out."""
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2")


async def mkdirs(client, path):
    return await client.mkdirs(path)


def _read_all(fd: int, timeout: float) -> bytes:
    """Everything written to the pipe until it closes (or the time runs out)."""
    import select

    data = b""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            break
        chunk = os.read(fd, 100)
        if not chunk:
            break
        data += chunk
    return data


def cleanup_mount(path: Path) -> None:
    if mounted(str(path)):
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def run_cluster(coro_fn, master_addrs: str, *args):
    """Run `await coro_fn(client, *args)` with a fresh client, from synchronous code."""

    async def main():
        client = ClusterClient(master_addrs)
        async with client:
            return await coro_fn(client, *args)

    return trio.run(main)
