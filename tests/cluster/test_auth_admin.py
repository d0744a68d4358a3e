"""The shared token, and the `fusecsi fs` admin command, against real processes."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import urllib.request

import pytest
import trio

from fusecsi.cluster.client import ROOT_INO, ClusterClient, ClusterError
from fusecsi.cluster.local import LocalCluster, free_port

TOKEN = "tok-4f1a9c"


METRICS_PORT = free_port()


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    base = tmp_path_factory.mktemp("secured")
    metrics = ("--metrics-address", f"127.0.0.1:{METRICS_PORT}")
    with LocalCluster(base, workers=1, token=TOKEN, master_args=metrics) as cluster:
        yield cluster


def test_master_metrics(secured):
    with urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10) as r:
        text = r.read().decode()
    assert "fusecsi_master_live_workers 1.0" in text
    assert "fusecsi_master_inodes" in text


async def test_token_required_and_checked(secured):
    async with ClusterClient(secured.master_addrs, token=TOKEN) as client:
        attr = await client.create(ROOT_INO, b"f", 0o644, 0, 0)
        await client.write(attr.ino, 0, b"ok")  # the worker checks the token too
        await client.commit(attr.ino, 2)
        assert await client.read(attr.ino, 0, 2) == b"ok"
    for token in ("wrong", None):
        async with ClusterClient(secured.master_addrs, token=token, timeout=5) as client:
            with pytest.raises(ClusterError) as info:
                await client.getattr(ROOT_INO)
            assert info.value.errno == errno.EACCES
            assert "token" in info.value.strerror or "authentication" in info.value.strerror


def test_token_never_on_argv_or_in_logs(secured):
    for proc in [secured.master, *secured.workers]:
        with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
            assert TOKEN.encode() not in f.read()
    for name in ("master", "worker0"):
        assert TOKEN not in secured.log_text(name)


def fs(cluster, *args, token_file=None, check=True, stdin=None):
    cmd = [sys.executable, "-m", "fusecsi", "fs", "--master-addrs", cluster.master_addrs]
    if token_file:
        cmd += ["--token-file", str(token_file)]
    env = {k: v for k, v in os.environ.items() if k != "FUSECSI_TOKEN"}
    proc = subprocess.run(
        [*cmd, *args], capture_output=True, env=env, timeout=60, input=stdin, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"fs {args} failed: {proc.stderr.decode()}")
    return proc


async def test_admin_command(secured, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    local = tmp_path / "in.bin"
    payload = os.urandom(3 << 20)
    local.write_bytes(payload)

    def scenario():
        fs(secured, "mkdir", "-p", "/vols/a/b", token_file=token_file)
        fs(secured, "put", str(local), "/vols/a/b/data.bin", token_file=token_file)
        out = fs(secured, "--json", "ls", "/vols/a/b", token_file=token_file).stdout
        (entry,) = json.loads(out)
        assert entry["name"] == "data.bin" and entry["size"] == len(payload)
        fs(secured, "get", "/vols/a/b/data.bin", str(tmp_path / "out.bin"), token_file=token_file)
        assert (tmp_path / "out.bin").read_bytes() == payload
        fs(secured, "mv", "/vols/a/b/data.bin", "/vols/a/moved.bin", token_file=token_file)
        stat_out = json.loads(
            fs(secured, "--json", "stat", "/vols/a/moved.bin", token_file=token_file).stdout
        )
        assert stat_out["type"] == "file"
        fs(secured, "quota", "/vols/a", "--max-bytes", str(10 << 20), token_file=token_file)
        quota = json.loads(fs(secured, "--json", "quota", "/vols/a", token_file=token_file).stdout)
        assert quota["used_bytes"] == len(payload) and quota["max_bytes"] == 10 << 20
        df = json.loads(fs(secured, "--json", "df", token_file=token_file).stdout)
        assert df["free_bytes"] > 0
        text = fs(secured, "ls", "/vols/a", token_file=token_file).stdout.decode()
        assert "moved.bin" in text and text.splitlines()[0].startswith("d")
        failed = fs(secured, "rm", "/vols/a", token_file=token_file, check=False)
        assert failed.returncode == 1 and b"not empty" in failed.stderr
        fs(secured, "rm", "-r", "/vols", token_file=token_file)
        missing = fs(secured, "stat", "/vols", token_file=token_file, check=False)
        assert missing.returncode == 1 and b"No such file" not in missing.stdout
        refused = fs(secured, "ls", "/", check=False)
        assert refused.returncode == 1 and b"authentication" in refused.stderr

    await trio.to_thread.run_sync(scenario)


async def test_fs_errors_are_one_line_with_the_path_and_errno_name(secured, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    cases = [
        (["mkdir", "/errs"], None),
        (["mkdir", "/errs"], "fusecsi fs mkdir: /errs: EEXIST: File exists"),
        (["quota", "/errs"], "fusecsi fs quota: /errs: ENODATA: no quota set on it or above it"),
        (["ls", "/missing"], "fusecsi fs ls: /missing: ENOENT: No such file or directory"),
        (
            ["mv", "/missing", "/x"],
            "fusecsi fs mv: /missing -> /x: ENOENT: No such file or directory",
        ),
        (["mkdir", "/errs/a/b"], "fusecsi fs mkdir: /errs/a/b: ENOENT: No such file or directory"),
        (
            ["put", str(tmp_path / "absent"), "/errs/f"],
            f"fusecsi fs put: {tmp_path / 'absent'}: ENOENT: No such file or directory",
        ),
    ]

    def scenario():
        for args, message in cases:
            proc = fs(secured, *args, token_file=token_file, check=message is None)
            if message is not None:
                assert proc.returncode == 1
                assert proc.stderr.decode().splitlines() == [message]

    await trio.to_thread.run_sync(scenario)
