"""The controller under cluster faults: a real `fusecsi controller` process talks to the real
master through FaultProxy (faultproxy.py), which passes each call on, holds it (a master that
does not answer) or answers a chosen errno in the master's place.

Every step of CreateVolume (first volume under a base, a later one, the same one again),
ControllerExpandVolume and DeleteVolume (delete, archive, retain) is driven through every
fault: the answer is the exact CSI code, the cluster is unchanged unless a change was passed
on before the fault, and the same call without faults then completes.
"""

from __future__ import annotations

import errno
import re

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from support.controller import (
    GiB,
    cluster,
    create_request,
    kube_api,
    module_spawn,
    open_client,
    start_controller,
    unique,
)
from support.faultproxy import HOLD, FaultProxy

from fusecsi.csi import bridge as grpc_bridge
from fusecsi.csi.generated import csi_pb2 as pb

__all__ = ["cluster", "kube_api", "module_spawn"]  # fixtures

TIMEOUT = 0.6  # --cluster-timeout: a held call is answered after about this long
TAG = b"trusted.fusecsi."
FAULTS = [
    (HOLD, Status.UNAVAILABLE),
    (errno.EIO, Status.INTERNAL),  # errnos the mapping does not name: INTERNAL, errno named
    (errno.EBUSY, Status.INTERNAL),
    (errno.ENOSPC, Status.RESOURCE_EXHAUSTED),
    (errno.EDQUOT, Status.RESOURCE_EXHAUSTED),
    (errno.EINVAL, Status.INVALID_ARGUMENT),
    (errno.ENAMETOOLONG, Status.INVALID_ARGUMENT),
    (errno.EACCES, Status.PERMISSION_DENIED),
    (errno.EPERM, Status.PERMISSION_DENIED),
]


@pytest.fixture(scope="module")
def controller_sock(module_spawn, tmp_path_factory):
    directory = tmp_path_factory.mktemp("faults")
    return start_controller(module_spawn, directory, "--cluster-timeout", str(TIMEOUT))[1]


@pytest.fixture
async def proxy(cluster, nursery):
    relay = FaultProxy(cluster.master_addrs)
    await nursery.start(relay.serve)
    return relay


async def snapshot(client, path: str) -> dict:
    """Everything below `path` a controller could change: entries, fusecsi tags, quotas."""
    out = {}
    todo = [path]
    while todo:
        here = todo.pop()
        attr = await client.resolve(here)
        tags = {
            name: await client.getxattr(attr.ino, name)
            for name in await client.listxattr(attr.ino)
            if name.startswith(TAG)
        }
        try:
            quota = await client.get_quota(attr.ino)
            limit = quota.max_bytes if quota.ino == attr.ino else None
        except OSError:
            limit = None
        out[here] = (attr.ino, attr.mode, tags, limit)
        for name, child, _ in await client.readdir(attr.ino):
            if child.mode & 0o040000:
                todo.append(f"{here}/{name.decode()}")
            else:
                out[f"{here}/{name.decode()}"] = (child.ino, child.mode, child.size)
    return out


class Scenario:
    """One RPC in a fresh corner of the cluster: `prepare` (no faults), `request`, and
    `done` (asserts the state after success)."""

    def __init__(self, call, proxy: FaultProxy, kind: str) -> None:
        self.call, self.proxy, self.kind = call, proxy, kind
        self.root = unique("/faults")
        self.base = f"{self.root}/base"
        policy = {"delete": "delete", "archive": "archive", "retain": "retain"}.get(kind, "delete")
        self.params = {"master-addrs": proxy.address, "fs-path": self.base, "on-delete": policy}
        self.name = unique("pv")
        self.volume_id = ""

    async def create(self, name: str) -> str:
        request = create_request(name, self.params)
        return (await self.call("Controller", "CreateVolume", request)).volume.volume_id

    async def prepare(self, client) -> None:
        await client.mkdirs(self.root)
        if self.kind == "create-first":
            return
        if self.kind == "create-second":
            await self.create(unique("pv-before"))
            return
        self.volume_id = await self.create(self.name)
        volume = await client.resolve(f"{self.base}/{self.name}")
        f = await client.create(volume.ino, b"data", 0o644, 0, 0)
        await client.write(f.ino, 0, b"kept")
        await client.commit(f.ino, 4)

    def request(self):
        if self.kind.startswith("create"):
            return "CreateVolume", create_request(self.name, self.params)
        if self.kind == "expand":
            return "ControllerExpandVolume", pb.ControllerExpandVolumeRequest(
                volume_id=self.volume_id, capacity_range=pb.CapacityRange(required_bytes=2 * GiB)
            )
        return "DeleteVolume", pb.DeleteVolumeRequest(volume_id=self.volume_id)

    async def done(self, client, reply) -> None:
        path = f"{self.base}/{self.name}"
        names = [
            n.decode() for n, _, _ in await client.readdir((await client.resolve(self.base)).ino)
        ]
        if self.kind.startswith("create"):
            attr = await client.resolve(path)
            volume_id = reply.volume.volume_id
            assert await client.getxattr(attr.ino, b"trusted.fusecsi.volume") == volume_id.encode()
            assert (await client.get_quota(attr.ino)).max_bytes == GiB
        elif self.kind == "expand":
            attr = await client.resolve(path)
            assert (await client.get_quota(attr.ino)).max_bytes == 2 * GiB
        elif self.kind == "delete":
            assert names == []
        elif self.kind == "archive":
            assert len(names) == 1 and names[0].startswith(f"{self.name}.archived-")
        else:
            attr = await client.resolve(path)
            assert await client.listxattr(attr.ino) == [b"trusted.fusecsi.volume"]


KINDS = ["create-first", "create-second", "create-again", "expand", "delete", "archive", "retain"]


@pytest.mark.parametrize("kind", KINDS)
async def test_every_step_through_every_fault(cluster, controller_sock, proxy, kind):
    async with (
        grpc_bridge.connect(str(controller_sock)) as call,
        open_client(cluster.master_addrs) as client,
    ):
        # a clean run counts the steps
        scenario = Scenario(call, proxy, kind)
        await scenario.prepare(client)
        proxy.reset()
        method, request = scenario.request()
        await scenario.done(client, await call("Controller", method, request))
        steps = len(proxy.calls)
        assert steps >= 3, proxy.calls
        if kind in ("create-first", "create-second"):  # born whole: nothing read back after
            assert proxy.calls[-1] == "mkvolume", proxy.calls

        for step in range(steps):
            for fault, code in FAULTS:
                scenario = Scenario(call, proxy, kind)
                await scenario.prepare(client)
                method, request = scenario.request()
                before = await snapshot(client, scenario.root)
                proxy.reset()
                proxy.fault_at(step, fault)
                with pytest.raises(GRPCError) as err:
                    await call("Controller", method, request)
                what = f"{kind}: {fault} at step {step} of {proxy.calls}: {err.value.message}"
                assert err.value.status is code, what
                if fault != HOLD:
                    assert errno.errorcode[fault] in err.value.message, what
                if not proxy.changed_cluster():
                    assert await snapshot(client, scenario.root) == before, what
                proxy.reset()  # the retry external-provisioner or -resizer makes
                await scenario.done(client, await call("Controller", method, request))


@pytest.mark.parametrize(
    ("kind", "after", "method", "message"),
    [
        # the directory vanished between two calls: an error to retry, never "not ours"
        ("delete", "resolve", "getxattr", "ENOENT.*retry"),
        ("create-again", "mkvolume", "resolve", "changed while being created; retry"),
    ],
)
async def test_a_directory_vanishing_mid_call_is_aborted(
    cluster, controller_sock, proxy, kind, after, method, message
):
    """ENOENT where only an ENODATA (no tag) or nothing at all is expected is ABORTED."""
    async with (
        grpc_bridge.connect(str(controller_sock)) as call,
        open_client(cluster.master_addrs) as client,
    ):
        scenario = Scenario(call, proxy, kind)
        await scenario.prepare(client)
        rpc, request = scenario.request()
        proxy.reset()
        await call("Controller", rpc, request)  # a clean run shows where the step is
        step = proxy.calls.index(method, proxy.calls.index(after) + 1)
        scenario = Scenario(call, proxy, kind)
        await scenario.prepare(client)
        rpc, request = scenario.request()
        before = await snapshot(client, scenario.root)
        proxy.reset()
        proxy.fault_at(step, errno.ENOENT)
        with pytest.raises(GRPCError) as err:
            await call("Controller", rpc, request)
        assert err.value.status is Status.ABORTED, err.value.message
        assert re.search(message, err.value.message), err.value.message
        assert await snapshot(client, scenario.root) == before


async def test_a_parent_removed_by_a_racing_delete_is_made_again(cluster, controller_sock, proxy):
    """Issue 18: DeleteVolume (in another controller) removes an empty parent a path-pattern
    made just after CreateVolume made it again: the volume's mkvolume answers ENOENT, and
    CreateVolume makes the parent once more and succeeds."""
    async with (
        grpc_bridge.connect(str(controller_sock)) as call,
        open_client(cluster.master_addrs) as client,
    ):
        base = unique("/faults")

        def request(name: str):
            params = {"master-addrs": proxy.address, "fs-path": base, "path-pattern": "ns/" + name}
            return create_request(unique("pv"), params)

        proxy.reset()
        await call("Controller", "CreateVolume", request("first"))  # shows the steps
        made = [i for i, method in enumerate(proxy.calls) if method == "mkvolume"]
        assert len(made) == 3, proxy.calls  # the volume (ENOENT), its parent, the volume
        await client.remove_tree(base)
        proxy.reset()
        proxy.fault_at(made[-1], errno.ENOENT)  # the parent vanished once more
        reply = await call("Controller", "CreateVolume", request("second"))
        attr = await client.resolve(f"{base}/ns/second")
        assert await client.getxattr(attr.ino, b"trusted.fusecsi.volume") == (
            reply.volume.volume_id.encode()
        )
        parent = await client.resolve(f"{base}/ns")
        assert await client.getxattr(parent.ino, b"trusted.fusecsi.parent") == base.encode()
