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

import errno
import os
import sys
from collections.abc import Mapping

from fusecsi.engines.base import BadParameter, Cluster, Launch, Usage

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
        return None

    def usage(self, volume_dir: str) -> Usage:
        used = files = 0
        for top, dirs, names in os.walk(volume_dir):
            files += len(dirs) + len(names)
            used += sum(os.lstat(os.path.join(top, n)).st_size for n in names)
        return Usage(used_bytes=used, total_bytes=None, used_inodes=files)
