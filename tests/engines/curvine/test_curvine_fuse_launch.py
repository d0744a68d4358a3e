"""What mountd would run for Curvine, run: the Launch of CurvineNode against a stand-in
curvine-fuse (curvine_fuse_standin.py: no Curvine binary can be had here) and a stand-in
master. Checks the command line is one curvine-fuse's flags accept, the config file
reaches it, fs-path is created on the master, the mount shows as fuse.curvinefs with a
statfs that answers, and SIGTERM unmounts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from fusecsi import engines
from fusecsi.mountd.mounts import top_mount

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
NODE = engines.node_engine("curvine")

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="needs root and /dev/fuse"
)


def standin_binary(tmp_path: Path) -> Path:
    binary = tmp_path / "curvine-fuse"
    binary.write_text(f'#!/bin/sh\nexec {sys.executable} {HERE / "curvine_fuse_standin.py"} "$@"\n')
    binary.chmod(0o755)
    return binary


def materialize(launch, private: Path) -> list[str]:
    """What mountd does with a Launch: private files mode 0600, `{private}` replaced."""
    private.mkdir(mode=0o700)
    for name, content in launch.files.items():
        fd = os.open(private / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(content)
    return [arg.replace("{private}", str(private)) for arg in launch.argv]


async def wait_for_mount(mnt: str, process: trio.Process, fstype: str) -> None:
    with trio.fail_after(15):
        while True:
            entry = top_mount(mnt)
            if entry is not None and entry.fstype == fstype:
                os.statvfs(mnt)
                return
            assert process.returncode is None, f"curvine-fuse exited {process.returncode}"
            await trio.sleep(0.05)


async def test_launch_mounts_fuse_curvinefs_and_sigterm_unmounts(master, tmp_path, monkeypatch):
    monkeypatch.setenv("FUSECSI_CURVINE_FUSE", str(standin_binary(tmp_path)))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cluster = NODE.parse_cluster({"master-addrs": master.address}, {})
    options = {"io-threads": "2", "enable-meta-cache": "true", "meta-cache-ttl": "2m"}
    launch = NODE.launch(cluster, "/base/k8s", options, str(mnt))
    argv = materialize(launch, tmp_path / "private")
    log = os.open(tmp_path / "daemon.log", os.O_WRONLY | os.O_CREAT, 0o600)
    env = {**os.environ, **launch.env, "PYTHONPATH": f"{REPO}:{HERE}"}
    process = await trio.lowlevel.open_process(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        await wait_for_mount(str(mnt), process, NODE.fstype)
        assert master.tree.nodes["/base/k8s"].is_dir  # created as curvine-fuse would
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            assert await process.wait() == 0
        assert top_mount(str(mnt)) is None
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        if top_mount(str(mnt)) is not None:
            await trio.run_process(["umount", "-l", str(mnt)], check=False)
        os.close(log)
    assert b"Traceback" not in (tmp_path / "daemon.log").read_bytes()


def test_a_flag_curvine_fuse_lacks_is_refused_by_the_standin(tmp_path):
    # the stand-in's flag list is curvine-fuse's: it would catch a wrong flag spelling
    result = subprocess.run(
        [sys.executable, str(HERE / "curvine_fuse_standin.py"), "--io-thread", "2"],
        capture_output=True,
        env={**os.environ, "PYTHONPATH": f"{REPO}:{HERE}"},
        check=False,
    )
    assert result.returncode == 2 and b"unrecognized arguments" in result.stderr
