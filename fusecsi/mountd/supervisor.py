"""The mount supervisor: one shared FUSE daemon per key, bound into every target of it.

The work is split by concern over a few modules, each a part of this one class:
publishing.py (publish/unpublish, request checks, secrets), lifecycle.py (daemon start,
adopt, linger, stop), recovery.py (health loop, diagnosis, recovery, re-binds, Events),
reconcile.py (the persisted table and restart), queries.py (stats, list), rolling.py
(daemons' builds, handing them over to new code). Everything an
engine knows (its daemon, fstype, probe, usage) is behind fusecsi.engines.base.NodeEngine.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Callable
from functools import partial

import trio

from fusecsi import engines as engine_registry
from fusecsi.engines.base import NodeEngine
from fusecsi.events import Events
from fusecsi.locks import KeyedLocks
from fusecsi.metrics import Distribution, Tally
from fusecsi.mountd.keystate import KeyState, err
from fusecsi.mountd.lifecycle import Lifecycle
from fusecsi.mountd.publishing import Publishing
from fusecsi.mountd.queries import Queries
from fusecsi.mountd.reconcile import Reconcile
from fusecsi.mountd.recovery import Recovery
from fusecsi.mountd.rolling import ROLL_GRACE, Rolling
from fusecsi.mountd.table import Entry, Table


# Rolling first: its _start_daemon records the build around Lifecycle's
class Supervisor(Rolling, Publishing, Lifecycle, Recovery, Reconcile, Queries):
    def __init__(
        self,
        state_dir: str,
        kubelet_dir: str,
        *,
        linger: float = 30.0,
        health_interval: float = 2.0,
        ready_timeout: float = 30.0,
        probe_timeout: float = 10.0,
        stop_grace: float = 5.0,
        events: Events | None = None,
        daemon_metrics: bool = False,
        takeover: bool = True,
        roll_adopted: bool = True,
        roll_grace: float = ROLL_GRACE,
        engines: Callable[[str], NodeEngine] = engine_registry.node_engine,
    ) -> None:
        self.state_dir = os.path.realpath(state_dir)
        self.kubelet_dir = os.path.realpath(kubelet_dir)
        self.mounts_dir = os.path.join(self.state_dir, "mounts")
        # secrets kept to restart a key's daemon (the directory's name predates engines)
        self.secrets_dir = os.path.join(self.state_dir, "tokens")
        # per key, the files of its Launch (0600): what its daemon reads its secrets from
        self.private_dir = os.path.join(self.state_dir, "private")
        self.logs_dir = os.path.join(self.state_dir, "logs")
        # with daemon_metrics, each daemon writes its metrics to <key id>.prom here and mountd
        # re-exports them
        self.metrics_dir = os.path.join(self.state_dir, "metrics")
        self.connections_dir = os.path.join(self.state_dir, "connections")
        self.daemon_metrics = daemon_metrics
        # mount connections ourselves and keep them (fusecsi/fuse/takeover.py), for the
        # engines that allow it (NodeEngine.takeover)
        self.takeover = takeover
        # hand adopted daemons of another build over to this one's, once serving
        self.roll_adopted = roll_adopted
        self.roll_grace = roll_grace
        self.serving = trio.Event()  # set by whoever serves the API (main.serve)
        self.engines = engines
        self.events = events or Events(None, "fusecsi-mountd")
        self.publishes = Tally("fusecsi_mountd_publishes_total", "publishes that succeeded")
        self.unpublishes = Tally("fusecsi_mountd_unpublishes_total", "targets unpublished")
        self.recoveries = Tally(
            "fusecsi_mountd_recoveries_total",
            "daemon replacements and re-binds, by cause (daemon_exited, mount_broken, "
            "target_lost, handover_failed) and result (ok, failed)",
            ["cause", "result"],
        )
        self.rolls = Tally(
            "fusecsi_mountd_rolls_total",
            "daemon handovers to this mountd's build (rolling.py), by result (rolled, "
            "skipped, failed)",
            ["result"],
        )
        self.recovery_seconds = Distribution(
            "fusecsi_mountd_recovery_seconds",
            "from noticing a broken mount to serving it again, by cause",
            ["cause"],
        )
        self.table = Table(os.path.join(self.state_dir, "table.json"))
        self.key_states: dict[str, KeyState] = {}
        self.linger = linger
        self.health_interval = health_interval
        self.ready_timeout = ready_timeout
        self.probe_timeout = probe_timeout
        self.stop_grace = stop_grace
        self.volume_locks = KeyedLocks()
        self.key_locks = KeyedLocks()
        self.target_locks = KeyedLocks()
        self._persist_lock = trio.Lock()
        self._changes = self._persisted = 0
        # threads that may hang on a dead mount keep their token until they return
        self._limiter = trio.CapacityLimiter(64)
        self._wake = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._lock_fd: int | None = None

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        if self._lock_fd is None:
            self.lock_state_dir()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.events.run)
            await self.reconcile()
            nursery.start_soon(self._health_loop)
            if self.roll_adopted:
                adopted = [k for k, s in self.key_states.items() if s.daemon is not None]
                nursery.start_soon(self.roll_adopted_daemons, adopted)
            task_status.started()

    def lock_state_dir(self) -> None:
        """Create the state dir and lock it for this process's lifetime.

        A second mountd on the same state would unmount and kill what the first one serves
        while it reconciles, so it is refused here, before it touches anything.
        """
        for path in (
            self.state_dir,
            self.mounts_dir,
            self.secrets_dir,
            self.private_dir,
            self.logs_dir,
            self.metrics_dir,
            self.connections_dir,
        ):
            os.makedirs(path, mode=0o700, exist_ok=True)
        fd = os.open(os.path.join(self.state_dir, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RuntimeError(f"another mountd is running on {self.state_dir}") from None
        self._lock_fd = fd

    def key_state(self, key_id: str) -> KeyState:
        """The key's state, created on first use."""
        return self.key_states.setdefault(key_id, KeyState())

    def engine_of(self, entry: Entry) -> NodeEngine:
        """The engine serving a key (EINVAL when this mountd does not have it)."""
        return self.engine_named(entry.key.engine)

    async def _blocking(self, fn, *args, seconds: float | None = None):
        """Run a syscall that may hang on a dead mount: a thread, a limiter, a deadline."""
        seconds = self.probe_timeout if seconds is None else seconds
        with trio.move_on_after(seconds):
            return await trio.to_thread.run_sync(
                partial(fn, *args), abandon_on_cancel=True, limiter=self._limiter
            )
        name = getattr(fn, "__name__", "call")
        raise err(errno.ETIMEDOUT, f"{name} did not return within {seconds:g}s")
