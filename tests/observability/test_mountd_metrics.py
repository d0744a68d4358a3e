"""mountd's /metrics and Events during a real recovery: a real cluster, a real mountd, real
FUSE daemons and bind mounts. A SIGKILLed daemon that cannot come back at once (the master is
down too) leaves its volume unhealthy and its pod told so; once the master is back the volume
recovers, the counters say why, and the pod hears it. The FUSE daemon's own counters reach
mountd's endpoint through its metrics file.

The Kubernetes API is the small fake of tests/controller (a real kube-apiserver cannot run
here); it records every Event POSTed to it.
"""

from __future__ import annotations

import os
import signal

import pytest
import trio
from support.controller import kube_api
from support.metrics import matching, poll, sample, scrape
from support.mountd import TOKEN, Mountd, make_dirs, read_text, read_write

from fusecsi.cluster.local import LocalCluster, free_port

__all__ = ["kube_api"]  # fixture


def write_and_read(path: str, data: bytes) -> bool:
    with open(path, "wb") as f:
        f.write(data)
    with open(path, "rb") as f:
        return f.read() == data


@pytest.fixture
def cluster(tmp_path):
    with LocalCluster(tmp_path / "cluster", workers=1, token=TOKEN) as running:
        yield running


@pytest.fixture
def node(tmp_path, cluster, kube_api):
    port = free_port()
    kubeconfig = kube_api.write_kubeconfig(tmp_path / "kubeconfig")
    mountd = Mountd(
        tmp_path / "node",
        cluster,
        **{"metrics-address": f"127.0.0.1:{port}", "kubeconfig": kubeconfig, "ready-timeout": 5},
    )
    mountd.metrics_port = port
    try:
        mountd.start()
        yield mountd
    finally:
        mountd.close()


async def test_publish_recovery_health_and_pod_events(node, cluster, kube_api):
    await make_dirs(cluster, "/obs/vol")
    kube_api.add_pod("apps", "web-0")
    target = node.make_parent(node.target("pod-web-0", "pv-obs"))
    answer = await node.client.publish(
        volume_id="vol-obs",
        cluster=cluster.master_addrs,
        fs_path="/obs",
        subpath="vol",
        target=target,
        readonly=False,
        secrets={"token": TOKEN},
        pod_namespace="apps",
        pod_name="web-0",
    )
    key = answer["key"]
    samples = scrape(node.metrics_port)
    assert sample(samples, "fusecsi_mountd_publishes_total") == 1
    assert sample(samples, "fusecsi_mountd_references", key=key) == 1
    assert sample(samples, "fusecsi_mountd_volume_healthy", volume_id="vol-obs") == 1
    assert sample(samples, "fusecsi_mountd_rpcs_total", method="publish", code="OK") == 1
    assert read_write(target, "kept", "written before the crash")
    data = os.urandom(3 << 20)
    assert await trio.to_thread.run_sync(write_and_read, os.path.join(target, "big"), data)

    def daemon_counted():
        # the daemon rewrites its metrics file every 2 s; mountd re-exports it with `key`
        s = scrape(node.metrics_port)
        return (
            sample(s, "fusecsi_mount_written_bytes_total", key=key) >= len(data)
            and sample(s, "fusecsi_mount_read_bytes_total", key=key) >= len(data)
            and s
        )

    counted = await poll(daemon_counted, deadline=20, what="the daemon's counters")
    assert sample(counted, "fusecsi_mount_ops_total", key=key, op="write", errno="OK") >= 3
    assert sample(counted, "fusecsi_mount_ops_total", key=key, op="create", errno="OK") == 2
    assert sample(counted, "fusecsi_mount_ops_total", key=key, op="lookup", errno="ENOENT") >= 1
    assert matching(counted, "fusecsi_mount_readahead_total", key=key) >= 1
    calls = matching(counted, "fusecsi_cluster_call_seconds_count", key=key, method="commit")
    assert calls >= 1
    assert sample(counted, "fusecsi_mount_in_flight", key=key) == 0

    [row] = await node.client.list()
    cluster.kill_master()
    os.kill(row["pid"], signal.SIGKILL)

    def unhealthy():
        s = scrape(node.metrics_port)
        healthy = sample(s, "fusecsi_mountd_volume_healthy", volume_id="vol-obs")
        return healthy == 0 and sample(s, "fusecsi_mountd_broken_targets") == 1 and s

    broken = await poll(unhealthy, deadline=30, what="volume reported broken")
    assert (
        sample(broken, "fusecsi_mountd_recoveries_total", cause="daemon_exited", result="ok") == 0
    )
    [told_broken] = await poll(
        lambda: [e for e in kube_api.events_about("web-0") if e["reason"] == "MountBroken"],
        deadline=30,
        what="MountBroken event",
    )
    assert told_broken["involvedObject"]["uid"] == "uid-apps-web-0"
    assert told_broken["metadata"]["namespace"] == "apps"
    assert target in told_broken["message"]

    cluster.restart_master()

    def healthy():
        s = scrape(node.metrics_port)
        return sample(s, "fusecsi_mountd_volume_healthy", volume_id="vol-obs") == 1 and s

    recovered = await poll(healthy, deadline=60, what="volume healthy again")
    assert (
        sample(recovered, "fusecsi_mountd_recoveries_total", cause="daemon_exited", result="ok")
        == 1
    )
    assert (
        sample(recovered, "fusecsi_mountd_recoveries_total", cause="daemon_exited", result="failed")
        >= 1
    )
    assert sample(recovered, "fusecsi_mountd_recovery_seconds_count", cause="daemon_exited") == 1
    assert sample(recovered, "fusecsi_mountd_broken_targets") == 0
    assert sample(recovered, "fusecsi_mountd_daemon_restarts", key=key) == 1
    [told_recovered] = await poll(
        lambda: [e for e in kube_api.events_about("web-0") if e["reason"] == "MountRecovered"],
        deadline=30,
        what="MountRecovered event",
    )
    assert "daemon_exited" in told_recovered["message"]
    assert read_text(os.path.join(target, "kept")) == "written before the crash"
    # one MountBroken for the whole outage, however many restarts failed
    assert len([e for e in kube_api.events_about("web-0") if e["reason"] == "MountBroken"]) == 1

    await node.client.unpublish("vol-obs", target)
    assert sample(scrape(node.metrics_port), "fusecsi_mountd_unpublishes_total") == 1
