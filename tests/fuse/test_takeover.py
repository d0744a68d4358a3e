"""Takeover: a replacement FUSE daemon serves the connection of a killed one, so processes
holding files open, a cwd or an mmap on the mount see no error (fusecsi/fuse/takeover.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

LOAD = Path(__file__).with_name("takeover_load.py")
KILLS = int(os.environ.get("FUSECSI_TAKEOVER_KILLS", "5"))


def start_load(directory: Path, result: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen(
        [sys.executable, str(LOAD), str(directory), str(result)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout.readline() == b"READY\n"
    return proc


def finish_load(proc: subprocess.Popen, result: Path) -> dict:
    proc.stdin.close()
    assert proc.wait(timeout=120) == 0
    return json.loads(result.read_text())


def test_open_files_cwd_and_mmap_survive_a_killed_daemon(make_mount, fs_path, tmp_path):
    mount = make_mount(fs_path, kept=True)
    (mount / "work").mkdir()
    load = start_load(mount / "work", tmp_path / "report.json")
    try:
        for _ in range(KILLS):
            time.sleep(0.5)
            mount.replace(signal.SIGKILL)
        time.sleep(0.5)
    finally:
        report = finish_load(load, tmp_path / "report.json")
    print(
        json.dumps({k: {n: v[n] for n in ("calls", "longest", "lost")} for k, v in report.items()})
    )
    for name, worker in report.items():
        assert worker["errors"] == [], name
        assert worker["calls"] > KILLS, name
    assert report["appender"]["lost"] <= KILLS
