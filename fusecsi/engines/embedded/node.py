"""mountd's half of the embedded cluster: `fusecsi mount` daemons, their fstype, the
cluster's statfs as the probe and the quota xattr as a volume's usage."""

from __future__ import annotations

import errno
import json
import os
import sys
from collections.abc import Mapping

from fusecsi import mount_options
from fusecsi.csi import volumes
from fusecsi.engines.base import BadParameter, Cluster, Launch, Usage

PARAM_MASTER_ADDRS = "master-addrs"
SECRET_TOKEN = "token"
# virtual and read-only on every directory under a quota (fusecsi/fuse/xattrs.py)
QUOTA_XATTR = "user.fusecsi.quota"
TOKEN_FILE = "token"


class EmbeddedNode:
    name = "embedded"
    fstype = "fuse.fusecsi"
    cluster_parameters = (PARAM_MASTER_ADDRS,)
    takeover = True
    parameters = (PARAM_MASTER_ADDRS,)  # what parse_cluster needs of the volume context

    def normalize_address(self, address: str) -> str:
        try:
            return volumes.normalize_master_addrs(address)
        except ValueError as exc:
            raise BadParameter(str(exc)) from None

    def parse_cluster(self, parameters: Mapping[str, str], secrets: Mapping[str, str]) -> Cluster:
        try:
            address = volumes.normalize_master_addrs(parameters.get(PARAM_MASTER_ADDRS, ""))
        except ValueError as exc:
            raise BadParameter(str(exc)) from None
        token = secrets.get(SECRET_TOKEN) or ""
        return Cluster(self.name, address, {SECRET_TOKEN: token} if token else {})

    def normalize_options(self, options: Mapping[str, str]) -> str:
        """Canonical form (every option, defaults included), so spellings share a daemon."""
        try:
            return mount_options.parse(options).to_arg()
        except ValueError as exc:
            raise BadParameter(str(exc)) from None

    def check_options(self, options: Mapping[str, str]) -> None:
        self.normalize_options(options)

    def launch(
        self, cluster: Cluster, fs_path: str, options: Mapping[str, str], mountpoint: str
    ) -> Launch:
        token = cluster.secrets.get(SECRET_TOKEN)
        argv = [sys.executable, "-m", "fusecsi", "mount"]
        argv += ["--master-addrs", cluster.address, "--fs-path", fs_path]
        argv += ["--options", self.normalize_options(options), "--ready-fd", "{ready_fd}"]
        if token:
            argv += ["--token-file", "{private}/" + TOKEN_FILE]
        return Launch(
            argv=[*argv, mountpoint],
            files={TOKEN_FILE: token.encode()} if token else {},
            ready="ready-fd",
            # the daemon serves a connection mountd mounted and keeps (fusecsi/fuse/takeover.py)
            takeover_argv=["--fuse-fd", "{fuse_fd}", "--connection", "{connection}"],
            metrics_argv=["--metrics-file", "{metrics_file}"],
        )

    def kernel_mount(
        self, cluster: Cluster, fs_path: str, options: Mapping[str, str]
    ) -> tuple[str, set[str]]:
        """The source and libfuse options the daemon would mount with (for takeover)."""
        from fusecsi.fuse import kernel

        parsed = mount_options.parse(options)
        return (
            kernel.fsname(cluster.address, fs_path),
            kernel.fuse_options(cluster.address, fs_path, parsed),
        )

    async def probe(self, cluster: Cluster) -> OSError | None:
        from fusecsi.cluster.client import ClusterClient
        from fusecsi.errors import describe, unwrap

        token = cluster.secrets.get(SECRET_TOKEN) or None
        try:
            async with ClusterClient(cluster.address, token=token, timeout=10.0) as client:
                await client.statfs()
            return None
        except Exception as raised:
            exc = unwrap(raised)
            return exc if isinstance(exc, OSError) else OSError(errno.EIO, describe(exc))

    def usage(self, volume_dir: str) -> Usage:
        """The nearest directory quota; OSError ENODATA when no quota applies."""
        raw = os.getxattr(volume_dir, QUOTA_XATTR)
        try:
            quota = json.loads(raw)
        except ValueError as exc:
            raise OSError(errno.EBADMSG, f"unreadable quota: {exc}") from None

        def number(name: str) -> int | None:
            value = quota.get(name)
            return value if isinstance(value, int) and not isinstance(value, bool) else None

        used = number("used_bytes")
        return Usage(
            used_bytes=used if used is not None else 0,
            total_bytes=number("max_bytes"),
            used_inodes=number("used_inodes"),
            total_inodes=number("max_inodes"),
        )
