"""The daemon's life: readiness, clean exit on signals, clear failures, secrets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from support.mounts import Mount, drop_kernel_caches, mounted


def test_ready_means_mounted_and_sigterm_unmounts(make_mount, fs_path):
    m = make_mount(fs_path)
    assert m.ready == b"READY\n" and mounted(str(m.path))
    with open("/proc/self/mountinfo") as f:
        line = next(x for x in f if x.split()[4] == str(m.path))
    fstype, source = line.split(" - ")[1].split()[:2]
    assert fstype == "fuse.fusecsi"
    assert source == f"fusecsi:{m.master_addrs}:{fs_path}"
    (m / "f").write_bytes(b"x")
    assert m.stop(signal.SIGTERM) == 0
    assert not mounted(str(m.path))


def test_sigint_unmounts(make_mount, fs_path):
    m = make_mount(fs_path)
    assert m.stop(signal.SIGINT) == 0
    assert not mounted(str(m.path))


def test_missing_fs_path_fails_without_mounting(cluster, tmp_path):
    m = Mount(cluster.master_addrs, "/no/such/dir", tmp_path / "m")
    with pytest.raises(RuntimeError):
        m.start()
    assert m.ready == b"" and m.proc.returncode not in (0, None)
    assert "/no/such/dir" in m.log_text()
    assert not mounted(str(m.path))


def test_bad_options_are_refused(cluster, fs_path, tmp_path):
    (tmp_path / "m").mkdir()
    cmd = [sys.executable, "-m", "fusecsi", "mount", "--master-addrs", cluster.master_addrs]
    cmd += ["--fs-path", fs_path, "--options", "no-such-option=1", str(tmp_path / "m")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "no-such-option" in done.stderr
    assert not mounted(str(tmp_path / "m"))


def test_read_only_option(make_mount, fs_path):
    rw = make_mount(fs_path, name="rw")
    (rw / "f").write_bytes(b"data")
    ro = make_mount(fs_path, "read-only=true", name="ro")
    assert (ro / "f").read_bytes() == b"data"
    with pytest.raises(OSError):
        (ro / "g").write_bytes(b"no")
    with pytest.raises(OSError):
        open(ro / "f", "ab")


def test_options_set_kernel_read_ahead(make_mount, fs_path):
    m = make_mount(fs_path, "read-ahead-kb=2048")
    with open("/proc/self/mountinfo") as f:
        device = next(x for x in f if x.split()[4] == str(m.path)).split()[2]
    with open(f"/sys/class/bdi/{device}/read_ahead_kb") as f:
        assert f.read().strip() == "2048"


def test_daemon_imports_stay_lean():
    code = (
        "import sys, fusecsi.fuse.main;"
        "bad = [m for m in ('grpc', 'grpclib', 'kubernetes', 'prometheus_client', 'asyncio')"
        " if m in sys.modules]; print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_token_comes_from_the_environment_not_argv(make_mount, fs_path):
    env = dict(os.environ, FUSECSI_TOKEN="not-on-the-command-line")
    m = make_mount(fs_path, env=env)
    with open(f"/proc/{m.proc.pid}/cmdline", "rb") as f:
        assert b"not-on-the-command-line" not in f.read()
    assert "not-on-the-command-line" not in m.log_text()


def test_lookup_counts_return_to_zero_when_the_kernel_forgets(make_mount, fs_path):
    """Every entry handed to the kernel (lookup, create, mkdir, readdirplus) is counted and
    every forget taken away: once the kernel drops its caches the daemon knows no inode."""
    m = make_mount(fs_path)
    (m / "d").mkdir()
    for i in range(40):
        (m / "d" / f"f{i}").write_bytes(b"x")
    os.symlink("f0", m / "d" / "link")
    os.link(m / "d" / "f1", m / "d" / "hard")
    with os.scandir(m / "d") as entries:  # readdirplus hands over every entry
        assert len([e.stat() for e in entries]) == 42
    drop_kernel_caches()  # the kernel sends FORGET for each inode
    os.statvfs(m.path)  # one more request: queued forgets are delivered before it
    assert m.stop() == 0
    stopped = [json.loads(line) for line in m.log_text().splitlines() if '"stopped"' in line]
    assert stopped and stopped[-1]["known_inodes"] == 0
