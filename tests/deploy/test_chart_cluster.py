"""The embedded cluster the chart deploys, run for real with the chart's own arguments: its
master and worker (on loopback, with the paths of their volumes and the addresses Kubernetes
would give them put in) form a cluster that takes the token from the Secret's file, and the
worker opens its short-circuit socket in the directory the chart shares with mountd."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
from support.helm import containers, find, render
from support.processes import FUSECSI, Spawner, wait_for_path

from fusecsi.cluster.local import free_port

TOKEN = "chart-cluster-token"


def substituted(args: list[str], table: dict[str, str]) -> list[str]:
    """The args with every occurrence of each key replaced (the pod's view → this machine)."""
    out = []
    for arg in args:
        for old, new in table.items():
            arg = arg.replace(old, new)
        out.append(arg)
    return out


def fs(table: dict[str, str], master: str, *args: str) -> subprocess.CompletedProcess:
    token = table["/etc/fusecsi/token/token"]
    command = [*FUSECSI, "fs", "--master-addrs", master, "--token-file", token, "--json", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


@pytest.fixture
def spawner(tmp_path):
    spawn = Spawner(tmp_path)
    yield spawn
    spawn.close()


def test_the_charts_master_and_worker_form_a_cluster(tmp_path, spawner):
    docs = render()
    master = containers(find(docs, "StatefulSet", "-master"))["master"]["args"]
    worker = containers(find(docs, "DaemonSet", "-worker"))["worker"]["args"]
    address = worker[worker.index("--master-addrs") + 1]  # the master Service's DNS name
    master_port, worker_port = free_port(), free_port()
    (tmp_path / "token").write_text(TOKEN + "\n")
    socket_dir = worker[worker.index("--local-socket") + 1].rsplit("/", 1)[0]
    common = {
        "/etc/fusecsi/token/token": str(tmp_path / "token"),
        address: f"127.0.0.1:{master_port}",
        ":8995": f":{master_port}",
        "$(POD_IP):8997": f"127.0.0.1:{worker_port}",
        ":8997": f":{worker_port}",
        socket_dir: str(tmp_path / "sockets"),
    }
    (tmp_path / "sockets").mkdir()
    spawner(*substituted(master, {**common, "/data": str(tmp_path / "master")}), name="master")
    worker_args = substituted(worker, {**common, "/data": str(tmp_path / "worker")})
    proc = spawner(*worker_args, name="worker")
    wait_for_path(tmp_path / "sockets" / "worker.sock", proc, timeout=30)

    master_addrs = f"127.0.0.1:{master_port}"
    deadline = time.monotonic() + 30
    while (df := fs(common, master_addrs, "df")).returncode or not json.loads(df.stdout).get(
        "total_bytes"
    ):
        assert time.monotonic() < deadline, f"no worker registered: {df.stderr}"
        time.sleep(0.1)
    assert fs(common, master_addrs, "mkdir", "/k8s").returncode == 0
    assert [e["name"] for e in json.loads(fs(common, master_addrs, "ls", "/").stdout)] == ["k8s"]
    # a client without the token is refused
    bare = subprocess.run(
        [*FUSECSI, "fs", "--master-addrs", master_addrs, "ls", "/"],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k != "FUSECSI_TOKEN"},
    )
    assert bare.returncode != 0
