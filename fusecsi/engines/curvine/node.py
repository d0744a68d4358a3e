"""mountd's half of Curvine: one `curvine-fuse` per key, known ready by its mountinfo.

`curvine-fuse` mounts by itself (no libfuse; fstype `fuse.curvinefs`), creates a missing
fs-path unless read-only, and unmounts on SIGTERM. It needs a config file even when every
setting comes from flags: mountd writes a minimal one into the key's private directory.
Mount options pass through as `--<key> <value>` only from `FLAGS`, a subset of what
`curvine-fuse list-config-flags --format json` lists: the flags that tune one daemon
without changing what it mounts, where, or which ports it binds.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Callable, Mapping

import trio

from fusecsi.csi import volumes
from fusecsi.engines.base import BadParameter, Cluster, Launch, Usage
from fusecsi.engines.curvine.namespace import QUOTA_XATTR, parse_quota

PARAM_MASTER_ADDRS = "master-addrs"
BINARY_ENV = "FUSECSI_CURVINE_FUSE"
BINARY_NAME = "curvine-fuse"
BINARY_IMAGE_PATH = "/opt/curvine/curvine-fuse"  # where Curvine's own images keep it
CONF_FILE = "curvine-cluster.toml"
# Every setting comes from flags; the file exists because curvine-fuse reads one.
CONF_TEXT = b"# written by fusecsi mountd: settings are passed as flags\n[fuse]\n"
PROBE_TIMEOUT = 10.0
USAGE_ENTRY_LIMIT = 20_000  # a larger volume reports its usage as unknown (ENODATA)

_DURATION = re.compile(r"^[0-9]+(ms|s|m|h|d)?$")


def _bool(text: str) -> str:
    value = text.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return "true"
    if value in ("false", "0", "no", "off"):
        return "false"
    raise ValueError("expected true or false")


def _count(limit: int) -> Callable[[str], str]:
    def check(text: str) -> str:
        value = text.strip()
        if not value.isascii() or not value.isdigit() or not 0 < int(value) <= limit:
            raise ValueError(f"expected a whole number 1-{limit}")
        return str(int(value))

    return check


def _duration(text: str) -> str:
    value = text.strip()
    if not _DURATION.match(value):
        raise ValueError("expected a duration such as 30s, 10m or 1h")
    return value


# curvine-fuse flag -> canonical value. Left out on purpose: master-addrs, fs-path,
# mnt-path, conf and mnt-number (fusecsi sets what is mounted where), web-port (every
# daemon on a node would want the same port), options (FUSE -o options), debug, and the
# `client.*` flags.
FLAGS: dict[str, Callable[[str], str]] = {
    "io-threads": _count(1024),
    "worker-threads": _count(1024),
    "tasks-per-mnt": _count(1024),
    "clone-fd": _bool,
    "fuse-channel-size": _count(1 << 20),
    "stream-channel-size": _count(1 << 20),
    "direct-io": _bool,
    "cache-readdir": _bool,
    "entry-timeout-ms": _count(1 << 31),
    "attr-timeout-ms": _count(1 << 31),
    "negative-timeout-ms": _count(1 << 31),
    "max-background": _count(65535),
    "congestion-threshold": _count(65535),
    "node-cache-timeout": _duration,
    "read-dir-fill-ino": _bool,
    "write-back-cache": _bool,
    "non-seekable": _bool,
    "check-permission": _bool,
    "metrics-enabled": _bool,
    "enable-meta-cache": _bool,
    "meta-cache-ttl": _duration,
    "remember": _bool,
    "list-limit": _count(1 << 20),
    "readonly": _bool,  # a switch: `--readonly` when true, nothing when false
}
SWITCHES = frozenset({"readonly"})


def canonical_options(options: Mapping[str, str]) -> dict[str, str]:
    """The options with canonical values, sorted; BadParameter for anything else."""
    result = {}
    for key in sorted(options):
        check = FLAGS.get(key)
        if check is None:
            raise BadParameter(
                f"curvine mount option {key!r} is not supported (supported: {', '.join(sorted(FLAGS))})"
            )
        try:
            result[key] = check(str(options[key]))
        except ValueError as exc:
            raise BadParameter(f"curvine mount option {key}={options[key]!r}: {exc}") from None
    return result


def find_binary() -> str:
    """curvine-fuse: $FUSECSI_CURVINE_FUSE, else on PATH, else where Curvine's images keep it."""
    configured = os.environ.get(BINARY_ENV)
    if configured:
        return configured
    found = shutil.which(BINARY_NAME)
    if found:
        return found
    if os.access(BINARY_IMAGE_PATH, os.X_OK):
        return BINARY_IMAGE_PATH
    raise OSError(
        errno.ENOENT,
        f"{BINARY_NAME} not found: put it on PATH or set {BINARY_ENV} to its path",
    )


class CurvineNode:
    name = "curvine"
    fstype = "fuse.curvinefs"
    cluster_parameters = (PARAM_MASTER_ADDRS,)
    takeover = False  # curvine-fuse opens /dev/fuse and mounts by itself

    def parse_cluster(self, parameters: Mapping[str, str], secrets: Mapping[str, str]) -> Cluster:
        try:
            address = volumes.normalize_master_addrs(parameters.get(PARAM_MASTER_ADDRS, ""))
        except ValueError as exc:
            raise BadParameter(str(exc)) from None
        return Cluster(self.name, address)  # Curvine has no authentication: no secrets

    def normalize_options(self, options: Mapping[str, str]) -> str:
        """Canonical `k=v,...`, so two spellings of the same options share a daemon."""
        return ",".join(f"{k}={v}" for k, v in canonical_options(options).items())

    def check_options(self, options: Mapping[str, str]) -> None:
        canonical_options(options)

    def launch(
        self, cluster: Cluster, fs_path: str, options: Mapping[str, str], mountpoint: str
    ) -> Launch:
        argv = [find_binary(), "--conf", "{private}/" + CONF_FILE]
        argv += ["--master-addrs", cluster.address, "--fs-path", fs_path]
        argv += ["--mnt-path", mountpoint]
        for key, value in canonical_options(options).items():
            if key in SWITCHES:
                argv += [f"--{key}"] if value == "true" else []
            else:
                argv += [f"--{key}", value]
        return Launch(argv=argv, files={CONF_FILE: CONF_TEXT}, ready="mountinfo")

    async def probe(self, cluster: Cluster) -> OSError | None:
        from fusecsi.engines.curvine.client import MasterClient

        try:
            with trio.fail_after(PROBE_TIMEOUT + 1):
                async with MasterClient(cluster.address, timeout=PROBE_TIMEOUT) as client:
                    await client.filesystem_info()
        except OSError as exc:
            return exc
        except trio.TooSlowError:
            return OSError(errno.ETIMEDOUT, "curvine masters did not answer in time")
        return None

    def usage(self, volume_dir: str) -> Usage:
        """Bytes of the files under the volume (a walk through the mount, bounded) and the
        size recorded at CreateVolume as its total: Curvine enforces no quota."""
        try:
            total = parse_quota(os.getxattr(volume_dir, QUOTA_XATTR))
        except OSError as exc:
            if exc.errno not in (errno.ENODATA, errno.EOPNOTSUPP):
                raise
            total = None
        used_bytes, used_inodes = walk_usage(volume_dir, USAGE_ENTRY_LIMIT)
        return Usage(used_bytes=used_bytes, total_bytes=total, used_inodes=used_inodes)


def walk_usage(root: str, limit: int) -> tuple[int, int]:
    """(bytes of regular files, entries) under `root`, not following symlinks or leaving
    the mount; OSError ENODATA past `limit` entries (then usage is unknown, not wrong)."""
    device = os.lstat(root).st_dev
    used, entries = 0, 0
    stack = [root]
    while stack:
        try:
            iterator = os.scandir(stack.pop())
        except FileNotFoundError:
            continue  # removed while we walked
        with iterator:
            for entry in iterator:
                entries += 1
                if entries > limit:
                    raise OSError(errno.ENODATA, f"more than {limit} entries: usage not counted")
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if st.st_dev != device:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    used += st.st_size
    return used, entries
