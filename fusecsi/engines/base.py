"""The engine seam: what mountd and the controller need from a distributed filesystem.

An engine is one kind of cluster (the embedded one, JuiceFS, SeaweedFS, Curvine). mountd and
the controller call only what is declared here; an engine's protocol, binary and fstype stay
in its own package under `fusecsi/engines/`. Two halves, because they run in different pods:

- `NodeEngine` (mountd): how one shared FUSE daemon for a key is started and known to be
  ready and alive, whether the cluster answers, and what a volume uses.
- `Namespace` (controller): a small path-level view of one cluster — directories, their
  xattr tags and quotas — on which the controller's volume rules (create tagged, refuse to
  touch what is not ours, delete / retain / archive) are written once for every engine.

Errors are OSError with an errno (ENOENT, EEXIST, ENOTEMPTY, ENOTDIR, EACCES, ...);
`Unreachable` means no server of the cluster answered (the CSI caller answers UNAVAILABLE).
Messages are one line and never carry a secret.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol


class Unreachable(OSError):
    """No server of the cluster answered (errno ETIMEDOUT or ECONNREFUSED)."""

    def __init__(self, message: str, code: int = errno.ETIMEDOUT) -> None:
        super().__init__(code, message)


class BadParameter(ValueError):
    """A StorageClass parameter, secret or mount option the engine cannot take (one line,
    user-fixable: the CSI caller answers INVALID_ARGUMENT or FAILED_PRECONDITION)."""


@dataclass(frozen=True)
class Cluster:
    """One cluster of one engine, as a StorageClass (address) and a CSI secret name it.

    `address` is public (it goes into volume ids, logs and the sharing key): master
    addresses, filer addresses, or a metadata URL with its password taken out. Everything
    secret is in `secrets`, which is never logged and never put on a command line.
    """

    engine: str
    address: str
    secrets: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class Launch:
    """How to start one FUSE daemon. mountd runs `argv` in its own session with `env` added
    to a minimal environment, after writing each of `files` (name -> content) mode 0600
    into the key's private directory, whose path replaces `{private}` in argv and env.
    `{connection}` is the key's connection directory; an env variable naming it is set only
    while mountd keeps the key's connection (takeover or fd_passing)."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict, repr=False)
    files: dict[str, bytes] = field(default_factory=dict, repr=False)
    # "ready-fd": the daemon writes READY to the fd that replaces `{ready_fd}` in argv (the
    # embedded daemon); "mountinfo": ready once `fstype` is mounted there and statfs answers
    ready: str = "mountinfo"
    # appended when mountd mounted the connection itself and keeps it (`takeover`):
    # `{fuse_fd}` is the /dev/fuse descriptor to serve, `{connection}` a private directory
    takeover_argv: list[str] = field(default_factory=list)
    # appended when mountd re-exports daemon metrics: `{metrics_file}` is where to write them
    metrics_argv: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Usage:
    """What NodeGetVolumeStats reports for one volume directory (None: unknown)."""

    used_bytes: int
    total_bytes: int | None
    used_inodes: int | None = None
    total_inodes: int | None = None


class NodeEngine(Protocol):
    name: str
    fstype: str  # mountinfo fstype of a live mount of this engine, e.g. "fuse.juicefs"
    # whether mountd may hold the /dev/fuse connection for the daemon, so that a dead
    # daemon's successor serves the same mount (open files, cwds, mmaps go on) instead of a
    # fresh mount bound on top of each target (their open files then answer ENOTCONN)
    takeover: bool
    # every StorageClass parameter parse_cluster reads (required or optional); any other
    # parameter that is not fusecsi's own is a mount option (see engines/options.py)
    cluster_parameters: tuple[str, ...]

    def parse_cluster(self, parameters: Mapping[str, str], secrets: Mapping[str, str]) -> Cluster:
        """The cluster named by a StorageClass's parameters and its CSI secret."""

    def check_options(self, options: Mapping[str, str]) -> None:
        """Raise BadParameter for a mount option outside this engine's allow-list."""

    def launch(
        self, cluster: Cluster, fs_path: str, options: Mapping[str, str], mountpoint: str
    ) -> Launch:
        """The daemon serving `fs_path` of `cluster` at `mountpoint`."""

    async def probe(self, cluster: Cluster) -> OSError | None:
        """Why the cluster does not answer, or None when it does (a cheap metadata call;
        the caller bounds it with a deadline)."""

    def usage(self, volume_dir: str) -> Usage:
        """What one volume uses, read through the live mount (`volume_dir` is the volume's
        directory inside the key's mount); quota-less engines report total_bytes None.
        OSError ENODATA: nothing is known (mountd then reports the mount's statfs only)."""

    # Optional members, looked up with getattr by mountd:
    # - normalize_options(options) -> str: the canonical `k=v,...` form of the options (two
    #   spellings of the same options share a daemon); default: sorted `k=v` pairs.
    # - kernel_mount(cluster, fs_path, options) -> (source, libfuse options): required when
    #   `takeover` is True and `fd_passing` is not; mountd mounts the connection with them
    #   (fusecsi/fuse/takeover.py) and the daemon gets it as `{fuse_fd}` (takeover_argv).
    # - fd_passing: bool, True when the engine's client mounts by itself but hands mountd
    #   its descriptor and takes one it is offered (JuiceFS's `_FUSE_FD_COMM` protocol,
    #   fusecsi/mountd/fdpass.py); with `takeover`, mountd keeps what it is handed.
    # - async hand_over(pid, connection_dir, grace) -> None: make the running daemon `pid`
    #   hand its mount over and exit without unmounting, leaving in `connection_dir` what
    #   its successor needs; return once it exited, OSError when it refused (it keeps
    #   serving). mountd then starts the successor on the kept connection (upgrades).


@dataclass(frozen=True)
class Node:
    """A directory entry as the controller sees it."""

    path: str
    is_dir: bool


class Namespace(Protocol):
    """A path-level view of one cluster for the controller; an async context manager that
    holds whatever connection (or private mount) it needs and releases it on exit."""

    quota_enforced: bool  # False: quotas are recorded on the directory, not enforced

    async def __aenter__(self) -> Namespace: ...
    async def __aexit__(self, *exc) -> None: ...

    async def lookup(self, path: str) -> Node | None: ...
    async def listdir(self, path: str) -> list[Node]: ...
    async def mkdirs(self, path: str) -> None:
        """Create `path` and missing parents (mode 0755); an existing directory is fine."""

    async def mkdir_tagged(
        self, path: str, mode: int, tags: Mapping[bytes, bytes], quota_bytes: int | None
    ) -> None:
        """Create the directory `path` (its parent exists) with its tags and quota; EEXIST
        when the name is taken; ENOENT when the parent is missing. Durable when it answers
        (no `sync` follows it). Engines that can do it in one step do it atomically; the
        others tag right after mkdir, in the order of `tags` (the first one is what makes the
        directory fusecsi's), then set the quota, and the controller treats an untagged fresh
        directory it just made as its own only through the tag it wrote."""

    async def get_tag(self, path: str, name: bytes) -> bytes | None:
        """The tag's value; None when the directory has no such tag (ENOENT: no `path`)."""

    async def set_tag(self, path: str, name: bytes, value: bytes) -> None: ...
    async def remove_tag(self, path: str, name: bytes) -> None:
        """ENODATA when there is no such tag."""

    async def get_quota(self, path: str) -> int | None:
        """The directory's own quota in bytes (not an ancestor's); None when it has none."""

    async def set_quota(self, path: str, max_bytes: int) -> None: ...
    async def rename(self, src: str, dst: str) -> None:
        """Rename without replacing: EEXIST when `dst` exists."""

    async def rmdir(self, path: str) -> None: ...
    async def remove_tree(self, path: str) -> None: ...
    async def sync(self) -> None:
        """Make every change made so far durable (a no-op where each call already is)."""

    async def capacity(self, path: str) -> int:
        """Bytes a new volume under `path` could still get (GetCapacity)."""
