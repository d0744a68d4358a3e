"""A FAKE NodeEngine for unit tests of mountd and the node service without a cluster.

It stands in for a distributed filesystem, which these tests do not want to start: its
"cluster" is a local directory (a tmpfs the test mounts), and its daemon is a real process
that checks its token file, bind-mounts `<cluster><fs_path>` at the mountpoint and stays
until SIGTERM (then unmounts). So mountd's real paths run against it: a Launch with a 0600
secrets file, readiness by mountinfo (the fstype at the mountpoint and a statfs), binds,
recovery of a killed daemon, the probe and usage. What it does not have is FUSE: its
fstype is the cluster directory's own ("tmpfs").
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path

from fusecsi.engines.base import BadParameter, Cluster, Launch, Usage
from fusecsi.mountd import mounts

DAEMON = r"""
import os, signal, subprocess, sys, time
cluster, fs_path, mountpoint, token_file = sys.argv[1:5]
def read(path):
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""
if read(os.path.join(cluster, ".token")) != read(token_file):
    print("authentication failed: bad token", flush=True)
    sys.exit(3)
source = cluster.rstrip("/") + fs_path
subprocess.run(["mount", "--bind", source, mountpoint], check=True)
def stop(*_):
    subprocess.run(["umount", "-l", mountpoint], check=False)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print("serving", flush=True)
while True:
    signal.pause()
"""

OPTIONS = ("flavour",)  # the fake's whole allow-list


class FakeNode:
    name = "fake"
    fstype = "tmpfs"
    takeover = False
    parameters = ("root",)  # the cluster is named by the directory `root`

    def parse_cluster(self, parameters: Mapping[str, str], secrets: Mapping[str, str]) -> Cluster:
        root = parameters.get("root", "")
        if not root.startswith("/"):
            raise BadParameter(f"root {root!r} must be an absolute path")
        token = secrets.get("token", "")
        return Cluster(self.name, root, {"token": token} if token else {})

    def check_options(self, options: Mapping[str, str]) -> None:
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise BadParameter(f"unknown mount option {unknown[0]!r} (allowed: flavour)")

    def launch(
        self, cluster: Cluster, fs_path: str, options: Mapping[str, str], mountpoint: str
    ) -> Launch:
        token = cluster.secrets.get("token", "")
        argv = [sys.executable, "-c", DAEMON, cluster.address, fs_path, mountpoint]
        return Launch(
            argv=[*argv, "{private}/token"],
            files={"token": token.encode()},
            ready="mountinfo",
        )

    async def probe(self, cluster: Cluster) -> OSError | None:
        if not os.path.isdir(cluster.address):  # noqa: ASYNC240 - a local directory
            return OSError(errno.ECONNREFUSED, f"{cluster.address} is gone")
        try:
            with open(os.path.join(cluster.address, ".token")) as f:  # noqa: ASYNC230
                expected = f.read()
        except FileNotFoundError:
            expected = ""
        if cluster.secrets.get("token", "") != expected:
            return OSError(errno.EACCES, "authentication failed: bad token")
        return None

    def usage(self, volume_dir: str) -> Usage:
        used = files = 0
        for top, dirs, names in os.walk(volume_dir):
            files += len(dirs) + len(names)
            used += sum(os.lstat(os.path.join(top, n)).st_size for n in names)
        return Usage(used_bytes=used, total_bytes=None, used_inodes=files)


FAKE = FakeNode()
TOKEN = "fake-token-51c2"


def resolve(name: str):
    """The engine registry with the fake added (Supervisor's and NodeService's `engines`)."""
    from fusecsi import engines

    return FAKE if name == "fake" else engines.node_engine(name)


@contextlib.contextmanager
def fake_cluster(base: Path, volumes=("v1", "v2")):
    """The fake's cluster at base/cluster: a tmpfs holding base/<name> volume directories
    and the token; every mount under `base` is gone afterwards."""
    cluster = base / "cluster"
    cluster.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(cluster)], check=True)
    try:
        (cluster / ".token").write_text(TOKEN)
        for name in volumes:
            (cluster / "base" / name).mkdir(parents=True)
        yield cluster
    finally:
        for entry in reversed(mounts.mounts_under(str(base))):
            subprocess.run(["umount", "-l", entry.mountpoint], check=False)


def supervisor_on_fake(base: Path, **options):
    """mountd's Supervisor in the test's trio loop, the fake among its engines
    (support.mountd.supervisor_in_process: `kill_daemons=False` keeps its daemons)."""
    from support.mountd import supervisor_in_process

    options = {"health_interval": 0.2, "ready_timeout": 10, **options}
    return supervisor_in_process(base, engines=resolve, **options)


def fake_target(sup, pod: str | None = None) -> str:
    """A kubelet target: its parent exists (kubelet makes it), `mount` does not."""
    parent = Path(sup.kubelet_dir, "pods", pod or str(uuid.uuid4()), "volumes")
    parent = parent / "kubernetes.io~csi" / "pv"
    parent.mkdir(parents=True)
    return str(parent / "mount")
