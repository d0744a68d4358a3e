"""The CSI gRPC server: real `fusecsi controller` / `fusecsi node` processes on unix sockets,
called through grpclib exactly as kubelet and the sidecars would."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat

import pytest
import trio
import trio_asyncio
from grpclib.client import Channel
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError
from support.processes import read_log, wait_for_path

from fusecsi import DRIVER_NAME, __version__
from fusecsi.csi import bridge as grpc_bridge
from fusecsi.csi.generated import csi_pb2 as pb

ROLES = {
    "controller": ["controller"],
    "node": ["node", "--node-id", "node-a"],
}


def start(spawn, tmp_path, role: str, *extra: str):
    sock = tmp_path / f"{role}.sock"
    proc = spawn(*ROLES[role], "--endpoint", f"unix://{sock}", *extra, name=role)
    wait_for_path(sock, proc)
    return proc, sock


@pytest.mark.parametrize("role", ROLES)
async def test_identity_rpcs(spawn, tmp_path, role):
    mountd = tmp_path / "mountd.sock"
    _, sock = start(spawn, tmp_path, role, *(["--mountd", f"unix://{mountd}"] * (role == "node")))
    async with grpc_bridge.connect(str(sock)) as call:
        info = await call("Identity", "GetPluginInfo", pb.GetPluginInfoRequest())
        assert (info.name, info.vendor_version) == (DRIVER_NAME, __version__)

        caps = await call("Identity", "GetPluginCapabilities", pb.GetPluginCapabilitiesRequest())
        services = {c.service.type for c in caps.capabilities if c.HasField("service")}
        expansion = {
            c.volume_expansion.type for c in caps.capabilities if c.HasField("volume_expansion")
        }
        if role == "controller":
            assert services == {pb.PluginCapability.Service.CONTROLLER_SERVICE}
            assert expansion == {pb.PluginCapability.VolumeExpansion.ONLINE}
        else:
            assert services == set() and expansion == set()

        probe = await call("Identity", "Probe", pb.ProbeRequest())
        if role == "controller":
            assert probe.ready.value is True
        else:
            # the node plugin is ready only while mountd answers
            assert probe.ready.value is False
            mountd_proc = spawn(
                "mountd",
                "--state-dir",
                str(tmp_path / "state"),
                "--socket",
                f"unix://{mountd}",
                "--kubelet-dir",
                str(tmp_path / "kubelet"),
                name="mountd",
            )
            wait_for_path(mountd, mountd_proc)
            probe = await call("Identity", "Probe", pb.ProbeRequest())
            assert probe.ready.value is True


async def test_unserved_rpcs_answer_unimplemented(spawn, tmp_path):
    _, sock = start(spawn, tmp_path, "controller")
    async with grpc_bridge.connect(str(sock)) as call:
        for service, method, request in [
            ("Node", "NodeGetInfo", pb.NodeGetInfoRequest()),
            (
                "GroupController",
                "GroupControllerGetCapabilities",
                pb.GroupControllerGetCapabilitiesRequest(),
            ),
        ]:
            with pytest.raises(GRPCError) as err:
                await call(service, method, request)
            assert err.value.status is Status.UNIMPLEMENTED
            assert method in err.value.message


class _RawCodec:
    """Sends bytes as they are, so a request can be made malformed on the wire."""

    __content_subtype__ = "proto"

    def encode(self, message, message_type):
        return message

    def decode(self, data, message_type):
        return message_type.FromString(data)


async def test_undecodable_request_is_invalid_argument(spawn, tmp_path):
    _, sock = start(spawn, tmp_path, "controller")

    async def send_garbage():
        channel = Channel(path=str(sock), codec=_RawCodec())
        try:
            # field 1 (name) as a length-delimited string whose length runs past the end
            async with channel.request(
                "/csi.v1.Identity/GetPluginInfo",
                Cardinality.UNARY_UNARY,
                bytes,
                pb.GetPluginInfoResponse,
            ) as stream:
                await stream.send_message(b"\x0a\x7fshort", end=True)
                return await stream.recv_message()
        finally:
            channel.close()

    async with trio_asyncio.open_loop():
        with pytest.raises(GRPCError) as err:
            await trio_asyncio.aio_as_trio(send_garbage)()
    assert err.value.status is Status.INVALID_ARGUMENT
    assert "does not parse" in err.value.message


async def test_each_call_logs_one_json_line_without_secrets(spawn, tmp_path):
    proc, sock = start(spawn, tmp_path, "node", "--mountd", f"unix://{tmp_path}/none.sock")
    request = pb.NodePublishVolumeRequest(
        volume_id="vol-1", target_path="/t", secrets={"token": "hunter2-SECRET"}
    )
    async with grpc_bridge.connect(str(sock)) as call:
        await call("Identity", "GetPluginInfo", pb.GetPluginInfoRequest())
        with pytest.raises(GRPCError):
            await call("Node", "NodePublishVolume", request)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
    text = read_log(proc)
    assert "hunter2-SECRET" not in text
    calls = [json.loads(line) for line in text.splitlines() if '"msg":"call"' in line]
    by_method = {c["method"]: c for c in calls}
    assert by_method["GetPluginInfo"]["code"] == "OK"
    assert by_method["NodePublishVolume"]["volume_id"] == "vol-1"
    assert by_method["NodePublishVolume"]["code"] != "OK"
    assert all(isinstance(c["duration_ms"], float | int) for c in calls)


def test_socket_mode_and_sigterm_cleanup(spawn, tmp_path):
    proc, sock = start(spawn, tmp_path, "controller")
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
    assert not sock.exists()


def test_stale_socket_from_killed_server_is_replaced(spawn, tmp_path):
    proc, sock = start(spawn, tmp_path, "controller")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert sock.exists()  # a killed server leaves its socket file behind
    start(spawn, tmp_path, "controller")
    assert stat.S_ISSOCK(os.stat(sock).st_mode)


def test_live_server_and_foreign_file_are_never_replaced(spawn, tmp_path):
    _, sock = start(spawn, tmp_path, "controller")
    second = spawn("controller", "--endpoint", f"unix://{sock}", name="second")
    assert second.wait(timeout=15) != 0
    assert "already listening" in read_log(second)

    precious = tmp_path / "precious.sock"
    precious.write_text("user data")
    third = spawn("controller", "--endpoint", f"unix://{precious}", name="third")
    assert third.wait(timeout=15) != 0
    assert precious.read_text() == "user data"


async def test_drain_lets_running_calls_finish_and_refuses_new_ones():
    from fusecsi.csi.server import CsiServer

    release = trio.Event()

    class Slow:
        async def Probe(self, request):
            await release.wait()
            return pb.ProbeResponse()

    server = CsiServer({"Identity": Slow()})
    results = []

    async def slow_call():
        results.append(await server.dispatch("/csi.v1.Identity/Probe", pb.ProbeRequest()))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(slow_call)
        await trio.sleep(0.01)
        nursery.start_soon(server.drain, 30)
        await trio.sleep(0.01)
        with pytest.raises(GRPCError) as err:
            await server.dispatch("/csi.v1.Identity/Probe", pb.ProbeRequest())
        assert err.value.status is Status.UNAVAILABLE
        release.set()
    assert len(results) == 1


def test_require_names_the_first_missing_field():
    from fusecsi.csi.validation import require

    full = pb.CreateVolumeRequest(
        name="v",
        capacity_range=pb.CapacityRange(required_bytes=1),
        volume_capabilities=[pb.VolumeCapability()],
        parameters={"a": "b"},
    )
    require(full, "name", "capacity_range", "volume_capabilities", "parameters")
    for missing in ("name", "capacity_range", "volume_capabilities", "parameters"):
        request = pb.CreateVolumeRequest()
        request.CopyFrom(full)
        request.ClearField(missing)
        with pytest.raises(GRPCError) as err:
            require(request, "name", "capacity_range", "volume_capabilities", "parameters")
        assert err.value.status is Status.INVALID_ARGUMENT
        assert err.value.message == f"{missing} missing in request"


def test_socket_path_appears_only_when_listening(tmp_path):
    from fusecsi import unix_socket

    path = str(tmp_path / "s.sock")
    sock = unix_socket.bind(path)
    try:
        assert os.listdir(tmp_path) == ["s.sock"]  # no staged name left behind
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(path)  # accepted into the backlog: it listens already
        client.close()
    finally:
        sock.close()
