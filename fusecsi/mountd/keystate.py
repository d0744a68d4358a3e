"""What mountd knows about a key beyond the persisted table, and the rules of its checks."""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import Any

from fusecsi.mountd.daemons import Daemon

# The kernel's answers for a FUSE connection that is gone: no point waiting, replace it.
DEAD = frozenset({errno.ENOTCONN, errno.ECONNABORTED})
# Answers of a daemon that is alive but failing; replaced after this many checks in a row,
# since a cluster outage also looks like this and a new daemon would not help it.
SICK = frozenset({errno.EIO, errno.ESTALE, errno.ETIMEDOUT})
SICK_LIMIT = 3
# a cluster that does not answer, as a publish reports it (the node plugin: UNAVAILABLE)
UNREACHABLE = frozenset({errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EPROTO})


def err(code: int, message: str) -> OSError:
    return OSError(code, message)


@dataclass
class KeyState:
    """A key's daemon and health as this mountd sees it (not persisted)."""

    daemon: Daemon | None = None
    state: str = "starting"  # running | starting | recovering | broken | stopping
    message: str = ""
    sick: int = 0
    retry_at: float = 0.0
    backoff: float = 1.0
    linger_gen: int = 0
    started_at: float = 0.0
    broken_targets: dict[str, str] = field(default_factory=dict)  # target -> why
    # why the current outage began (daemon_exited, mount_broken) and when
    cause: str = ""
    broken_since: float = 0.0
    cluster_lost: bool = False  # the last failed check found the cluster silent too
    told_broken: set[str] = field(default_factory=set)  # targets whose pod heard it
    # the mount's /dev/fuse descriptor, kept (fusecsi/mountd/keeper.py): while it is open a
    # dead daemon's mount waits for the next daemon instead of failing (takeover)
    conn: Any = None
    # the listener through which the daemon passes that descriptor (fdpass.FdServer), for
    # engines whose client does (NodeEngine.fd_passing)
    fd_server: Any = None
