"""Run a JuiceFS `Launch` the way base.Launch describes it (what mountd does): `{private}`
replaced by the key's private directory, files written there 0600, env added to a minimal
environment, its own session; ready once the engine's fstype is mounted and statfs answers."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

from support import launching

from fusecsi.engines.base import Launch
from fusecsi.engines.juicefs.privmount import mounted_fstype

_libc = ctypes.CDLL(None, use_errno=True)
MNT_DETACH = 2


class Running:
    def __init__(self, launch: Launch, private: Path, mountpoint: Path) -> None:
        self.mountpoint = mountpoint
        self.log_path = private / "daemon.log"
        # no mountd keeps the connection here: its variables are left out, as mountd does
        # without one (daemons.spawn), and juicefs mounts by itself
        env = {k: v for k, v in launch.env.items() if "{connection}" not in v}
        self.proc = launching.start(replace(launch, env=env), private, self.log_path)

    def wait_ready(self, fstype: str, timeout: float = 30.0) -> float:
        """Seconds from now until ready; fails with the daemon's log if it exits first."""
        started = time.monotonic()
        while mounted_fstype(str(self.mountpoint)) != fstype:
            if self.proc.poll() is not None:
                raise AssertionError(f"juicefs exited: {self.log_path.read_text()[-2000:]}")
            if time.monotonic() - started > timeout:
                raise AssertionError(f"not ready: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.02)
        os.statvfs(self.mountpoint)
        return time.monotonic() - started

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        detach(self.mountpoint)


def detach(mountpoint: Path) -> None:
    """Lazily unmount whatever is left at `mountpoint` (a dead FUSE mount after a kill)."""
    while mounted_fstype(str(mountpoint)) is not None:
        if _libc.umount2(str(mountpoint).encode(), MNT_DETACH) != 0:
            break
