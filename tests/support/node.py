"""One node for the node plugin's tests: a LocalCluster (master + worker, with a token), a
real `fusecsi mountd` and a real `fusecsi node`, and kubelet-style target paths.

Import the fixtures into a test module: `from support.node import cluster_fixture, node_fixture`;
tests ask for them by their names, `cluster` and `node`. `spawn` is the top-level
conftest's fixture.
"""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from fusecsi.cluster.client import ClusterClient
from fusecsi.cluster.local import LocalCluster
from fusecsi.csi import volumes
from fusecsi.csi.generated import csi_pb2 as pb
from fusecsi.dev.stack import kill_daemons_under, leftover_mounts
from fusecsi.mountd.client import MountdClient
from support.processes import read_log, wait_for_path

TOKEN = "node-test-token-7f3a"
FS_PATH = "/kube"
Mode = pb.VolumeCapability.AccessMode


@dataclass
class Volume:
    volume_id: str
    context: dict[str, str]
    path: str  # in the cluster


@pytest.fixture(scope="module", name="cluster")
def cluster_fixture(tmp_path_factory):
    with LocalCluster(tmp_path_factory.mktemp("cluster"), workers=1, token=TOKEN) as running:
        yield running


class NodeStack:
    def __init__(self, root: Path, spawn, cluster: LocalCluster) -> None:
        self.root = root
        self.spawn = spawn
        self.cluster = cluster
        self.kubelet = root / "kubelet"
        self.state = root / "state"
        self.mountd_socket = root / "mountd.sock"
        self.csi_socket = root / "csi.sock"
        self.kubelet.mkdir()
        self.mountd_proc: subprocess.Popen | None = None
        self.node_proc: subprocess.Popen | None = None

    @property
    def master_addrs(self) -> str:
        return self.cluster.master_addrs

    def start_mountd(self, *extra: str) -> subprocess.Popen:
        """Start mountd (the previous one, if any, must be dead) and wait until it listens."""
        socket_arg = f"unix://{self.mountd_socket}"
        args = ["--state-dir", str(self.state), "--socket", socket_arg]
        args += ["--kubelet-dir", str(self.kubelet), "--linger", "0", *extra]
        self.mountd_socket.unlink(missing_ok=True)
        self.mountd_proc = self.spawn("mountd", *args, name="mountd")
        wait_for_path(self.mountd_socket, self.mountd_proc, timeout=30)
        return self.mountd_proc

    def start_node(self, *extra: str) -> subprocess.Popen:
        args = ["--endpoint", f"unix://{self.csi_socket}", "--node-id", "node-a", *extra]
        args += ["--mountd", f"unix://{self.mountd_socket}"]
        self.csi_socket.unlink(missing_ok=True)  # a killed plugin leaves its socket behind
        self.node_proc = self.spawn("node", *args, name="node")
        wait_for_path(self.csi_socket, self.node_proc, timeout=30)
        return self.node_proc

    def node_log(self) -> str:
        assert self.node_proc is not None
        return read_log(self.node_proc)

    def target(self, pv: str = "pv") -> str:
        """A kubelet target: the parent exists (kubelet makes it), `mount` does not."""
        parent = self.kubelet / "pods" / str(uuid.uuid4()) / "volumes" / "kubernetes.io~csi" / pv
        parent.mkdir(parents=True)
        return str(parent / "mount")

    async def volume(self, name: str, *, max_bytes=None, max_inodes=None) -> Volume:
        """A directory under FS_PATH (what CreateVolume makes), with an optional quota."""
        path = f"{FS_PATH}/{name}"
        async with ClusterClient(self.master_addrs, token=TOKEN) as client:
            attr = await client.mkdirs(path)
            if max_bytes is not None or max_inodes is not None:
                await client.set_quota(attr.ino, max_bytes, max_inodes)
        ref = volumes.VolumeRef(self.master_addrs, FS_PATH, name, "retain")
        context = {"master-addrs": self.master_addrs, "fs-path": FS_PATH, "subpath": name}
        return Volume(ref.volume_id(), context, path)

    async def mountd_list(self) -> list[dict]:
        return await MountdClient(f"unix://{self.mountd_socket}").list()

    async def refs(self) -> list[dict]:
        return [ref for entry in await self.mountd_list() for ref in entry["refs"]]

    def close(self) -> None:
        self.spawn.close()  # mountd first, so nothing restarts what is cleaned up below
        kill_daemons_under(self.root)
        for mountpoint in leftover_mounts(self.root):
            subprocess.run(["umount", "-l", mountpoint], check=False, capture_output=True)


@pytest.fixture(name="node")
async def node_fixture(tmp_path, spawn, cluster):
    """mountd + node plugin, both running; everything they mounted is gone afterwards."""
    stack = NodeStack(tmp_path, spawn, cluster)
    try:
        stack.start_mountd("--health-interval", "0.5")
        stack.start_node()
        yield stack
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(stack.close)


def publish_request(
    volume: Volume,
    target: str,
    *,
    mode=Mode.SINGLE_NODE_WRITER,
    readonly: bool = False,
    context: dict | None = None,
    flags=(),
    token: str | None = TOKEN,
) -> pb.NodePublishVolumeRequest:
    return pb.NodePublishVolumeRequest(
        volume_id=volume.volume_id,
        target_path=target,
        volume_capability=pb.VolumeCapability(
            mount=pb.VolumeCapability.MountVolume(mount_flags=list(flags)),
            access_mode=Mode(mode=mode),
        ),
        readonly=readonly,
        volume_context=volume.context if context is None else context,
        secrets={"token": token} if token else {},
    )


def unpublish_request(volume: Volume, target: str) -> pb.NodeUnpublishVolumeRequest:
    return pb.NodeUnpublishVolumeRequest(volume_id=volume.volume_id, target_path=target)


def is_mount_point(path: str) -> bool:
    return any(m == path for m in leftover_mounts(Path(path).parent))


def processes_with(text: str) -> list[int]:
    """Pids whose command line contains `text` (a secret must never be found there)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if text.encode() in cmdline:
            found.append(int(pid))
    return found


def pause(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGSTOP)


def resume(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGCONT)
