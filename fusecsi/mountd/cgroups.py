"""A cgroup (v2) of its own for every FUSE daemon, under a parent outside mountd's.

A container runtime stops a container by killing every process in the container's cgroup
(cgroup.kill, or freezer + SIGKILL on v1). A daemon moved out of that cgroup is not among
them, so it keeps serving its pods while mountd's container restarts, and the next mountd
adopts it (see docs/contracts.md, "FUSE daemons outlive mountd's container").

The parent is set once at start (`use`, from `fusecsi mountd --daemon-cgroup`) and read by
`daemons.spawn`; without it daemons stay in mountd's cgroup, as a plain child would.
"""

from __future__ import annotations

import contextlib
import errno
import os

PREFIX = "daemon-"

_parent: str | None = None


def use(parent: str | None) -> None:
    """Place daemons under `parent` (created if missing); ValueError if it is no cgroup v2."""
    global _parent
    if parent is not None:
        os.makedirs(parent, exist_ok=True)
        # cgroup.controllers exists only in cgroup v2 directories: a v1 hierarchy (or a plain
        # directory) would take the mkdir and leave daemons where the runtime kills them
        if not os.path.exists(os.path.join(parent, "cgroup.controllers")):
            raise ValueError(f"--daemon-cgroup {parent} is not a cgroup v2 directory")
        sweep(parent)
    _parent = parent


def place(pid: int) -> str | None:
    """Move a just-spawned daemon into a new cgroup of its own; its path (None when unset).

    Called before the daemon is ready, so no daemon mountd reports as serving can still be
    in mountd's cgroup. OSError when the move fails (the caller stops the daemon).
    """
    if _parent is None:
        return None
    sweep(_parent)
    path = os.path.join(_parent, f"{PREFIX}{pid}")
    os.makedirs(path, exist_ok=True)
    try:
        with open(os.path.join(path, "cgroup.procs"), "w") as f:
            f.write(str(pid))
        _check_outside_own(pid)
    except OSError:
        with contextlib.suppress(OSError):
            os.rmdir(path)  # fails (EBUSY) while the daemon is in it; the sweep removes it
        raise
    return path


def _check_outside_own(pid: int) -> None:
    """EINVAL when the daemon's cgroup is mountd's own or below it (the runtime would kill it
    with mountd): a parent under a container's own view of /sys/fs/cgroup, say."""
    own = _cgroup_of("self")
    if own == "/" and not _private_namespace():
        return  # mountd in the root cgroup: no container to outlive
    theirs = _cgroup_of(str(pid))
    if theirs == own or theirs.startswith(own.rstrip("/") + "/"):
        raise OSError(errno.EINVAL, f"daemon cgroup {theirs} is inside mountd's own ({own})")


def _cgroup_of(pid: str) -> str:
    """The cgroup v2 path of a process, as this process's cgroup namespace shows it."""
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            if line.startswith("0::"):
                return line[3:].strip()
    return ""


def _private_namespace() -> bool:
    """Whether this process has a cgroup namespace of its own (then "/" is its container)."""
    try:
        return os.stat("/proc/self/ns/cgroup").st_ino != os.stat("/proc/1/ns/cgroup").st_ino
    except OSError:
        return False


def sweep(parent: str) -> None:
    """Remove the cgroups of daemons that exited (an empty cgroup is the only one rmdir takes).

    A cgroup whose pid is alive is left alone: another mountd sharing the parent may have
    just created it and not yet moved its daemon in.
    """
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        pid = name.removeprefix(PREFIX)
        if name.startswith(PREFIX) and pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(parent, name))
