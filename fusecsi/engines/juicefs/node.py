"""mountd's half of JuiceFS: one foreground `juicefs mount` per key."""

from __future__ import annotations

import os
from collections.abc import Mapping

from fusecsi.engines.base import Cluster, Launch, Usage
from fusecsi.engines.juicefs import handover, metaurl, options, probe

FSTYPE = "fuse.juicefs"

# Set, JFS_SUPERVISOR makes `juicefs mount` serve the mount itself instead of forking a
# supervisor that restarts a crashed child: mountd is the supervisor, and the pid it
# started must be the one whose death means the mount is dead.
SERVE_DIRECTLY = {"JFS_SUPERVISOR": "fusecsi"}

# The client passes its /dev/fuse descriptor through this socket (fusecsi/mountd/fdpass.py)
# and, served one, takes over that mount as it is; a successor reads the handles its
# predecessor dumped on SIGHUP (handover.py) from the state file. mountd sets them only
# while it keeps the key's connection ({connection}).
FD_PASSING = {
    "_FUSE_FD_COMM": "{connection}/fd.sock",
    "_FUSE_STATE_PATH": "{connection}/" + handover.STATE_FILE,
}

# always on: xattrs (applications and the controller's tags), no internal files in the
# volume tree, no usage report home, logs on stderr for mountd
FIXED_ARGS = ["--enable-xattr", "--hide-internal", "--no-usage-report", "--no-syslog"]


def mount_argv(
    meta: metaurl.MetaURL, subdir: str, mountpoint: str, cache_dir: str, extra: list[str]
) -> list[str]:
    argv = [metaurl.binary(), "mount", meta.public, mountpoint, *FIXED_ARGS]
    if subdir.strip("/"):
        argv.append(f"--subdir={subdir}")
    argv.append(f"--cache-dir={cache_dir}")
    return argv + extra


class JuiceFSNode:
    name = metaurl.ENGINE
    fstype = FSTYPE
    # the metadata URL comes from the secret only: parse_cluster refuses it as a parameter
    cluster_parameters = ("metaurl",)
    # mountd keeps the mount's connection, and gets it from the client itself (fdpass.py):
    # a SIGKILLed daemon's successor serves the same mount, nothing is re-bound
    takeover = True
    fd_passing = True

    def parse_cluster(self, parameters: Mapping[str, str], secrets: Mapping[str, str]) -> Cluster:
        return metaurl.parse_cluster(parameters, secrets)

    def check_options(self, options_: Mapping[str, str]) -> None:
        options.check(options_)

    def launch(
        self, cluster: Cluster, fs_path: str, options_: Mapping[str, str], mountpoint: str
    ) -> Launch:
        meta = metaurl.meta_of(cluster)
        argv = mount_argv(meta, fs_path, mountpoint, "{private}/cache", options.arguments(options_))
        env = {**meta.env, **SERVE_DIRECTLY, **FD_PASSING}
        return Launch(argv=argv, env=env, ready="mountinfo")

    async def hand_over(self, pid: int, connection_dir: str, grace: float) -> None:
        """Make the running daemon `pid` hand its mount over and exit, leaving its handles
        in `connection_dir` for its successor; OSError when it refused (it keeps serving)."""
        await handover.hand_over(pid, connection_dir, grace)

    async def probe(self, cluster: Cluster) -> OSError | None:
        return await probe.probe(metaurl.meta_of(cluster))

    def usage(self, volume_dir: str) -> Usage:
        # JuiceFS answers statfs of a directory with the nearest directory quota above it
        # (limit and usage; the quota's changes reach a mount within seconds), else with the
        # whole filesystem's
        st = os.statvfs(volume_dir)
        total = st.f_blocks * st.f_frsize
        used = (st.f_blocks - st.f_bfree) * st.f_frsize
        return Usage(
            used_bytes=used,
            total_bytes=total,
            used_inodes=st.f_files - st.f_ffree,
            total_inodes=st.f_files,
        )
