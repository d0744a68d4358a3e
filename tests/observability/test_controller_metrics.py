"""The controller's and the master's /metrics move as volumes are created and deleted, and a
refused delete becomes a Kubernetes Event: real `fusecsi controller` and cluster processes.

The Kubernetes API is the small fake of tests/controller (a real kube-apiserver cannot run
here); it records every Event POSTed to it.
"""

from __future__ import annotations

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from support.controller import create_request, kube_api, module_spawn, open_client, start_controller
from support.metrics import metered_cluster, poll, sample, scrape

from fusecsi.cluster.local import free_port
from fusecsi.csi import bridge as grpc_bridge
from fusecsi.csi.generated import csi_pb2 as pb
from fusecsi.csi.volumes import VolumeRef

__all__ = ["kube_api", "module_spawn"]  # fixtures
REFUSED = "FAILED_PRECONDITION"


@pytest.fixture(scope="module")
def metered(tmp_path_factory):
    with metered_cluster(tmp_path_factory.mktemp("cluster")) as cluster:
        yield cluster


async def test_worker_counts_blocks_and_requests(metered):
    cluster = metered
    before = scrape(cluster.worker_metrics_port)
    # data over TCP: the worker's RPCs
    async with open_client(cluster.master_addrs, short_circuit=False) as client:
        f = await client.create(1, b"worker-metrics", 0o644, 0, 0)
        await client.write(f.ino, 0, b"x" * (1 << 20))
        await client.commit(f.ino, 1 << 20)
        assert await client.read(f.ino, 0, 10) == b"x" * 10
    after = scrape(cluster.worker_metrics_port)
    for method in ("write_block", "read_block"):
        name, labels = "fusecsi_worker_rpcs_total", {"method": method, "code": "OK"}
        assert sample(after, name, **labels) > sample(before, name, **labels)
    assert sample(after, "fusecsi_worker_blocks") == sample(before, "fusecsi_worker_blocks") + 1
    assert sample(after, "fusecsi_worker_used_bytes") >= (1 << 20)
    assert sample(after, "fusecsi_worker_free_bytes") > 0


async def test_worker_counts_short_circuit_opens(metered):
    """A client on the worker's host reads and writes the block files itself: the worker
    counts the descriptors it hands over, and no block travels through its RPCs."""
    cluster = metered
    before = scrape(cluster.worker_metrics_port)
    async with open_client(cluster.master_addrs) as client:
        f = await client.create(1, b"local-metrics", 0o644, 0, 0)
        await client.write(f.ino, 0, b"y" * (1 << 20))
        await client.commit(f.ino, 1 << 20)
    async with open_client(cluster.master_addrs) as reader:
        assert await reader.read(f.ino, 0, 10) == b"y" * 10
    after = scrape(cluster.worker_metrics_port)
    opens = "fusecsi_worker_local_opens_total"
    for mode in ("write", "read"):
        grew = sample(after, opens, mode=mode, code="OK") - sample(
            before, opens, mode=mode, code="OK"
        )
        assert grew >= 1, mode
    for method in ("write_block", "read_block"):
        name, labels = "fusecsi_worker_rpcs_total", {"method": method, "code": "OK"}
        assert sample(after, name, **labels) == sample(before, name, **labels)


async def test_counters_and_a_refused_delete_event(metered, kube_api, module_spawn, tmp_path):
    cluster = metered
    port = free_port()
    kubeconfig = kube_api.write_kubeconfig(tmp_path / "kubeconfig")
    _, sock = start_controller(
        module_spawn,
        tmp_path,
        "--kubeconfig",
        str(kubeconfig),
        "--metrics-address",
        f"127.0.0.1:{port}",
    )
    master_before = scrape(cluster.metrics_port)
    params = {"master-addrs": cluster.master_addrs, "fs-path": "/", "on-delete": "retain"}
    async with grpc_bridge.connect(str(sock)) as call:
        volume = (await call("Controller", "CreateVolume", create_request("pv-obs", params))).volume
        after_create = scrape(port)
        assert (
            sample(after_create, "fusecsi_csi_calls_total", method="CreateVolume", code="OK") == 1
        )
        latency = sample(
            after_create, "fusecsi_csi_call_seconds_count", method="CreateVolume", code="OK"
        )
        assert latency == 1
        created = sample(
            after_create, "fusecsi_controller_volumes_created_total", on_delete="retain"
        )
        assert created == 1

        # a directory fusecsi did not make, at the path a volume id names
        foreign = VolumeRef(cluster.master_addrs, "/", "not-ours", "delete").volume_id()
        async with open_client(cluster.master_addrs) as client:
            await client.mkdirs("/not-ours")
        kube_api.add_pvc("team", "claim-obs")
        kube_api.add_pv("pv-foreign", foreign, claim=("team", "claim-obs"))
        with pytest.raises(GRPCError) as refused:
            await call("Controller", "DeleteVolume", pb.DeleteVolumeRequest(volume_id=foreign))
        assert refused.value.status is Status.FAILED_PRECONDITION

        await call("Controller", "DeleteVolume", pb.DeleteVolumeRequest(volume_id=volume.volume_id))

        [on_claim] = await poll(
            lambda: kube_api.events_about("claim-obs"), deadline=20, what="event on the PVC"
        )
        # retried (the provisioner does, for ever): no second Event on the same PVC
        with pytest.raises(GRPCError):
            await call("Controller", "DeleteVolume", pb.DeleteVolumeRequest(volume_id=foreign))
        # the PVC is gone by the time of the second attempt: the PV carries the event
        del kube_api.pvcs["team", "claim-obs"]
        with pytest.raises(GRPCError):
            await call("Controller", "DeleteVolume", pb.DeleteVolumeRequest(volume_id=foreign))

        [on_pv] = await poll(
            lambda: kube_api.events_about("pv-foreign"), deadline=20, what="event on the PV"
        )
        assert on_pv["involvedObject"]["kind"] == "PersistentVolume"
        # events are posted in order: the retry's turn came before the PV's Event
        assert len(kube_api.events_about("claim-obs")) == 1
        assert on_pv["metadata"]["namespace"] == "default"

    assert on_claim["reason"] == "DeleteRefused" and on_claim["type"] == "Warning"
    # what a person reads: no Python reprs
    assert "None" not in on_claim["message"] and "b'" not in on_claim["message"]
    assert on_claim["involvedObject"] == {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "namespace": "team",
        "name": "claim-obs",
        "uid": "uid-team-claim-obs",
    }
    assert on_claim["metadata"]["namespace"] == "team"
    assert "/not-ours" in on_claim["message"] and "nothing was changed" in on_claim["message"]
    after = scrape(port)
    assert sample(after, "fusecsi_controller_delete_refusals_total") == 3  # one retry
    assert sample(after, "fusecsi_controller_volumes_deleted_total", on_delete="retain") == 1
    refusals = sample(after, "fusecsi_csi_calls_total", method="DeleteVolume", code=REFUSED)
    assert refusals == 3
    master_after = scrape(cluster.metrics_port)
    for method in ("mkvolume", "removexattr", "sync_journal"):  # create, retain
        name, labels = "fusecsi_master_rpcs_total", {"method": method, "code": "OK"}
        assert sample(master_after, name, **labels) > sample(master_before, name, **labels)
    assert sample(master_after, "fusecsi_master_journal_fsync_seconds_count") > sample(
        master_before, "fusecsi_master_journal_fsync_seconds_count"
    )
