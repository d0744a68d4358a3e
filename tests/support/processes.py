"""Real subprocesses for tests: start fusecsi roles, wait for their sockets, read their logs.

Imported as `from support.processes import ...`: several test directories have their own
conftest.py, so `from conftest import` would find whichever pytest loaded first."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

FUSECSI = [sys.executable, "-m", "fusecsi"]


class Spawner:
    """Starts fusecsi roles as real subprocesses and always reaps them."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen] = []

    def __call__(self, *args: str, name: str = "role", env: dict | None = None):
        log = open(self.log_dir / f"{name}-{len(self.procs)}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [*FUSECSI, *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        proc.log_path = log.name
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)


def wait_for_path(path: Path | str, proc: subprocess.Popen | None = None, timeout=15.0) -> None:
    """Wait until `path` exists; fail early (with the log) if `proc` exits first."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited {proc.returncode}: {read_log(proc)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout}s")
        time.sleep(0.02)


def read_log(proc: subprocess.Popen) -> str:
    return Path(proc.log_path).read_text(errors="replace")
