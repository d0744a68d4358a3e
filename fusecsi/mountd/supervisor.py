"""The mount supervisor: publish, unpublish, stats, recovery and restart reconciliation.

Lock order: target lock, then key lock. The target lock makes "is this target free?" and
"bind it" one step; the key lock serialises daemon start/stop/recovery and binds of one
key, so recovery never re-binds a target that an unpublish is removing. Different keys
(and different targets) proceed in parallel.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import signal
import stat
import time
from dataclasses import dataclass, field
from functools import partial

import trio

from fusecsi import mount_options
from fusecsi.errors import describe, unwrap
from fusecsi.events import Events
from fusecsi.fuse import kernel, takeover
from fusecsi.locks import KeyedLocks
from fusecsi.logs import fields
from fusecsi.metrics import Distribution, Tally
from fusecsi.mountd import inputs, mounts
from fusecsi.mountd.daemons import Daemon, DaemonFailed, cmdline_matches, spawn, take_fuse_fd
from fusecsi.mountd.table import Entry, Key, Ref, Table, write_atomic

log = logging.getLogger(__name__)

QUOTA_XATTR = "user.fusecsi.quota"
# The kernel's answers for a FUSE connection that is gone: no point waiting, replace it.
DEAD = frozenset({errno.ENOTCONN, errno.ECONNABORTED})
# Answers of a daemon that is alive but failing; replaced after this many checks in a row,
# since a cluster outage also looks like this and a new daemon would not help it.
SICK = frozenset({errno.EIO, errno.ESTALE, errno.ETIMEDOUT})
SICK_LIMIT = 3
MAX_BACKOFF = 30.0
# A daemon that dies sooner than this after starting is crash-looping: its next
# replacement waits (with growing backoff) instead of following at once.
CRASH_WINDOW = 10.0
# Recovery binds the new mount on top of the dead one (a container's HostToContainer copy
# follows only mounts stacked on it), so every replacement adds a layer per target. A dead
# layer cannot be removed from under a live one (detaching it takes the live one with it);
# layers go at unpublish. Past this many, a target is reset instead: mounts are a node-wide
# limited resource, and only a daemon crash-looping for minutes gets here.
MAX_LAYERS = 16


# a cluster that does not answer, as a publish reports it (the node plugin: UNAVAILABLE)
UNREACHABLE = frozenset({errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EPROTO})


def _err(code: int, message: str) -> OSError:
    return OSError(code, message)


@dataclass
class Runtime:
    """What mountd knows about a key beyond the persisted table."""

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
    # mountd's duplicate of the mount's /dev/fuse descriptor: while it is open a dead
    # daemon's mount waits for the next daemon instead of failing (takeover)
    conn_fd: int | None = None


class Supervisor:
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
    ) -> None:
        self.state_dir = os.path.realpath(state_dir)
        self.kubelet_dir = os.path.realpath(kubelet_dir)
        self.mounts_dir = os.path.join(self.state_dir, "mounts")
        self.tokens_dir = os.path.join(self.state_dir, "tokens")
        self.logs_dir = os.path.join(self.state_dir, "logs")
        # with daemon_metrics, each daemon writes its metrics to <key id>.prom here and mountd
        # re-exports them
        self.metrics_dir = os.path.join(self.state_dir, "metrics")
        self.connections_dir = os.path.join(self.state_dir, "connections")
        self.daemon_metrics = daemon_metrics
        self.takeover = takeover  # mount connections ourselves and keep them (takeover.py)
        self.events = events or Events(None, "fusecsi-mountd")
        self.publishes = Tally("fusecsi_mountd_publishes_total", "publishes that succeeded")
        self.unpublishes = Tally("fusecsi_mountd_unpublishes_total", "targets unpublished")
        self.recoveries = Tally(
            "fusecsi_mountd_recoveries_total",
            "daemon replacements and re-binds, by cause (daemon_exited, mount_broken, "
            "target_lost) and result (ok, failed)",
            ["cause", "result"],
        )
        self.recovery_seconds = Distribution(
            "fusecsi_mountd_recovery_seconds",
            "from noticing a broken mount to serving it again, by cause",
            ["cause"],
        )
        self.table = Table(os.path.join(self.state_dir, "table.json"))
        self.runtime: dict[str, Runtime] = {}
        self.linger = linger
        self.health_interval = health_interval
        self.ready_timeout = ready_timeout
        self.probe_timeout = probe_timeout
        self.stop_grace = stop_grace
        self.key_locks = KeyedLocks()
        self.target_locks = KeyedLocks()
        self._persist_lock = trio.Lock()
        self._changes = self._persisted = 0
        # threads that may hang on a dead mount keep their token until they return
        self._limiter = trio.CapacityLimiter(64)
        self._wake = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._lock_fd: int | None = None

    # ------------------------------------------------------------ lifecycle

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        if self._lock_fd is None:
            self.lock_state_dir()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.events.run)
            await self.reconcile()
            nursery.start_soon(self._health_loop)
            task_status.started()

    def lock_state_dir(self) -> None:
        """Create the state dir and lock it for this process's lifetime.

        A second mountd on the same state would unmount and kill what the first one serves
        while it reconciles, so it is refused here, before it touches anything.
        """
        for path in (
            self.state_dir,
            self.mounts_dir,
            self.tokens_dir,
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

    def _rt(self, key_id: str) -> Runtime:
        return self.runtime.setdefault(key_id, Runtime())

    async def _blocking(self, fn, *args, seconds: float | None = None):
        """Run a syscall that may hang on a dead mount: a thread, a limiter, a deadline."""
        seconds = self.probe_timeout if seconds is None else seconds
        with trio.move_on_after(seconds):
            return await trio.to_thread.run_sync(
                partial(fn, *args), abandon_on_cancel=True, limiter=self._limiter
            )
        name = getattr(fn, "__name__", "call")
        raise _err(errno.ETIMEDOUT, f"{name} did not return within {seconds:g}s")

    async def persist(self) -> None:
        """Write the table; callers that queue up behind one write share the next one."""
        self._changes += 1
        wanted = self._changes
        async with self._persist_lock:
            if self._persisted >= wanted:
                return
            covered = self._changes
            data = self.table.snapshot()
            await trio.to_thread.run_sync(write_atomic, self.table.path, data)
            self._persisted = covered

    # ------------------------------------------------------------ inputs

    async def resolve_target(self, target, code: int, *, publish: bool = False) -> str:
        """The real path of `target`; `code` when it is outside the kubelet dir or (to
        publish) not kubelet's CSI target shape (inputs.TARGET_SHAPE).

        Only the parent is resolved (it is an ordinary directory that kubelet made); the
        last component is never followed, so a broken mount at the target cannot hang it
        and a symlink there cannot redirect the bind.
        """
        try:
            inputs.check_path(target)
        except ValueError as exc:
            raise _err(errno.EINVAL, f"target: {exc}") from None
        parent, name = os.path.split(target.rstrip("/"))
        if name in ("", ".", ".."):
            raise _err(errno.EINVAL, f"target {target!r} has no final directory name")
        real_parent = await self._blocking(os.path.realpath, parent)
        real = os.path.join(real_parent, name)
        if not real.startswith(self.kubelet_dir.rstrip("/") + "/"):
            raise _err(code, f"target {target!r} is outside the kubelet dir {self.kubelet_dir}")
        if real == self.state_dir or real.startswith(self.state_dir + "/"):
            raise _err(code, f"target {target!r} is inside mountd's state dir")
        if publish:
            try:
                inputs.check_target_shape(real[len(self.kubelet_dir.rstrip("/")) + 1 :])
            except ValueError as exc:
                raise _err(code, str(exc)) from None
        return real

    def _metrics_file(self, key_id: str) -> str:
        return os.path.join(self.metrics_dir, f"{key_id}.prom")

    def _token_path(self, key_id: str) -> str:
        return os.path.join(self.tokens_dir, key_id)

    async def _save_token(self, key_id: str, token: str | None) -> None:
        if not token:
            return
        if self._load_token(key_id) != token:
            await trio.to_thread.run_sync(write_atomic, self._token_path(key_id), token.encode())

    def _load_token(self, key_id: str) -> str | None:
        try:
            with open(self._token_path(key_id)) as f:
                return f.read() or None
        except FileNotFoundError:
            return None

    # ------------------------------------------------------------ publish

    async def publish(
        self,
        volume_id,
        master_addrs,
        fs_path,
        subpath,
        options,
        target,
        readonly,
        token,
        pod_namespace=None,
        pod_name=None,
    ) -> dict:
        from fusecsi.csi import volumes

        try:
            inputs.check_volume_id(volume_id)
        except ValueError as exc:
            raise _err(errno.EINVAL, str(exc)) from None
        if not isinstance(readonly, bool):
            raise _err(errno.EINVAL, "readonly must be a boolean")
        if token is not None and not isinstance(token, str):
            raise _err(errno.EINVAL, "token must be a string or None")
        for value in (pod_namespace, pod_name):
            if value is not None and not (isinstance(value, str) and 0 < len(value) <= 253):
                raise _err(errno.EINVAL, "pod namespace and name must be short strings or None")
        try:
            key = Key.normalized(master_addrs, fs_path, options)
            subpath = volumes.validate_subpath(subpath)
        except (ValueError, TypeError, AttributeError) as exc:
            raise _err(errno.EINVAL, str(exc)) from None
        target = await self.resolve_target(target, errno.EPERM, publish=True)
        ref = Ref(volume_id, target, subpath, readonly, pod_namespace, pod_name)
        async with self.target_locks.hold(target):
            found = self.table.by_target(target)
            if found is not None:
                entry, old = found
                if entry.key != key or old != ref:
                    raise _err(
                        errno.EEXIST,
                        f"target {target} already holds volume {old.volume_id} "
                        f"(subpath {old.subpath}, readonly {old.readonly}, key {entry.key.id})",
                    )
                # a dead daemon's mount keeps its fstype and device: ask for a live one too
                if self._bound(entry, ref) and self._live_mount(entry):
                    self.publishes.add()
                    return self._answer(entry, False)
            elif mounts.top_mount(target) is not None:
                raise _err(errno.EEXIST, f"target {target} is already a mount point")
            async with self.key_locks.hold(key.id):
                try:
                    entry, started = await self._ensure_daemon(key, token)
                    if found is not None:
                        if self._bound(entry, ref):  # a recovery re-bound it meanwhile
                            self.publishes.add()
                            return self._answer(entry, started)
                    # published before but its mount is gone or dead: the bind goes on top
                    await self._bind(entry, ref)
                except BaseException:
                    unused = self.table.entries.get(key.id)
                    if unused is not None and not unused.refs:
                        with trio.CancelScope(shield=True):
                            await self._release(unused)
                    raise
                entry.refs[target] = ref
                self._rt(key.id).broken_targets.pop(target, None)
                await self.persist()
        self.publishes.add()
        log.info(
            "published",
            extra=fields(volume_id=volume_id, target=target, key_id=key.id, readonly=readonly),
        )
        return self._answer(entry, started)

    def _answer(self, entry: Entry, started: bool) -> dict:
        return {"key": entry.key.id, "mountpoint": entry.mountpoint, "daemon_started": started}

    def _bound(self, entry: Entry, ref: Ref) -> bool:
        """The target shows the key's current mount at the ref's subpath."""
        top, source = mounts.top_mounts(ref.target, entry.mountpoint)
        return self._serves(top, source) and top.root == "/" + ref.subpath

    @staticmethod
    def _serves(top, source) -> bool:
        """`top` is a bind of the daemon's live mount `source` (same device), not a dead one."""
        return mounts.is_fuse_mount(top) and source is not None and top.device == source.device

    def _live_mount(self, entry: Entry) -> bool:
        rt = self.runtime.get(entry.key.id)
        return (
            rt is not None
            and rt.daemon is not None
            and rt.daemon.alive
            and rt.state == "running"
            and mounts.is_fuse_mount(mounts.top_mount(entry.mountpoint))
        )

    async def _ensure_daemon(self, key: Key, token: str | None) -> tuple[Entry, bool]:
        """The key's entry with a running daemon (caller holds the key lock).

        The stored token (used to restart the daemon later) is replaced only by one that is
        known to work, so one request with a stale secret cannot break later recoveries.
        """
        rt = self._rt(key.id)
        rt.linger_gen += 1  # a pending linger stop no longer applies
        entry = self.table.entries.get(key.id)
        if entry is not None and self._live_mount(entry):
            if (
                token
                and token != self._load_token(key.id)
                and await self._cluster_answers(entry, token)
            ):
                await self._save_token(key.id, token)
            return entry, False
        if entry is None:
            entry = Entry(key, os.path.join(self.mounts_dir, key.id))
            self.table.entries[key.id] = entry
            await self._start_daemon(entry, token)
        else:
            await self._recover(entry, "daemon not running at publish", token)
        return entry, True

    async def _bind(self, entry: Entry, ref: Ref) -> bool:
        """Bind `mountpoint/subpath` on top of whatever the target shows.

        Never unmounts first (a dead mount stays underneath until unpublish), so a missing
        source leaves the target as it was, never an empty local directory. True when the
        target had MAX_LAYERS and was reset instead (containers then keep the dead copy).
        """
        if not mounts.is_fuse_mount(mounts.top_mount(entry.mountpoint)):
            raise _err(errno.EIO, f"{entry.mountpoint} is not a live {mounts.FUSE_FSTYPE} mount")
        created = await self._make_target(ref.target)
        below = mounts.stack_at(ref.target)
        reset = len(below) >= MAX_LAYERS
        if reset:
            log.warning("too many stacked mounts; resetting", extra=fields(target=ref.target))
        bind = partial(mounts.bind_beneath, replace=reset)
        try:
            await self._blocking(bind, entry.mountpoint, ref.subpath, ref.target)
        except OSError as exc:
            if created:
                with contextlib.suppress(OSError):
                    os.rmdir(ref.target)
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                raise _err(
                    errno.ENOENT,
                    f"subpath {ref.subpath!r} is missing under {entry.key.fs_path} "
                    f"on {entry.key.master_addrs}: {exc.strerror}",
                ) from None
            raise
        try:
            if not self._bound(entry, ref):
                raise _err(errno.EIO, f"bind onto {ref.target} did not produce the expected mount")
            if ref.readonly:
                await self._blocking(mounts.remount_readonly, ref.target)
        except BaseException:
            keep = below[-1].mount_id if below and not reset else None
            with trio.CancelScope(shield=True):
                await self._blocking(mounts.unmount_above, ref.target, keep)  # ours only
            raise
        return reset

    async def _make_target(self, target: str) -> bool:
        """Create the target directory (CSI: the plugin creates it); True if we made it."""

        def make() -> bool:
            # kubelet makes the parent; making it here too costs nothing and stays inside
            # the kubelet dir (its existing part was resolved already)
            os.makedirs(os.path.dirname(target), 0o750, exist_ok=True)
            try:
                os.mkdir(target, 0o750)
                return True
            except FileExistsError:
                if mounts.top_mount(target) is not None:
                    return False  # a mount, maybe dead (lstat fails): the bind goes on top
                info = os.lstat(target)
                if not stat.S_ISDIR(info.st_mode):
                    raise _err(errno.EEXIST, f"target {target} is not a directory") from None
                return False

        return await self._blocking(make)

    # ------------------------------------------------------------ unpublish

    async def unpublish(self, volume_id, target) -> dict:
        if not isinstance(volume_id, str) or not volume_id:
            raise _err(errno.EINVAL, "volume_id is empty")
        target = await self.resolve_target(target, errno.EINVAL)
        async with self.target_locks.hold(target):
            found = self.table.by_target(target)
            if found is None:
                # a leftover of ours (mountd died between bind and persist) is still ours
                if mounts.is_fuse_mount(mounts.top_mount(target)):
                    await self._unmount(target)
                await self._remove_target(target)
                return {"removed": False}
            entry, ref = found
            if ref.volume_id != volume_id:
                raise _err(
                    errno.EINVAL, f"target {target} holds volume {ref.volume_id}, not {volume_id}"
                )
            async with self.key_locks.hold(entry.key.id):
                await self._unmount(target)
                del entry.refs[target]
                self._rt(entry.key.id).broken_targets.pop(target, None)
                self._rt(entry.key.id).told_broken.discard(target)
                await self.persist()
                if not entry.refs:
                    await self._release(entry)
            await self._remove_target(target)
        self.unpublishes.add()
        log.info(
            "unpublished", extra=fields(volume_id=volume_id, target=target, key_id=entry.key.id)
        )
        return {"removed": True}

    async def _unmount(self, path: str, *, lazy: bool = False) -> None:
        await self._blocking(partial(mounts.unmount_all, path, lazy=lazy))

    async def _remove_target(self, target: str) -> None:
        """CSI: the plugin removes the target it created; an empty directory only."""
        if mounts.top_mount(target) is not None:
            return
        with contextlib.suppress(OSError):
            await self._blocking(os.rmdir, target)

    # ------------------------------------------------------------ daemons

    async def _start_daemon(self, entry: Entry, token: str | None = None) -> None:
        """Start the key's daemon: on the kept connection when there is one (takeover),
        else on a new mount of its own."""
        key, rt = entry.key, self._rt(entry.key.id)
        token = token or self._load_token(key.id)
        rt.state = "starting"
        fresh = rt.conn_fd is None
        if fresh:
            os.makedirs(entry.mountpoint, mode=0o755, exist_ok=True)
            if mounts.top_mount(entry.mountpoint) is not None:
                await self._unmount(entry.mountpoint, lazy=True)
            if self.takeover:
                rt.conn_fd = await self._blocking(self._mount_connection, entry)
        try:
            daemon = await spawn(
                master_addrs=key.master_addrs,
                fs_path=key.fs_path,
                options=key.options,
                mountpoint=entry.mountpoint,
                token=token,
                log_path=os.path.join(self.logs_dir, f"{key.id}.log"),
                metrics_file=self._metrics_file(key.id) if self.daemon_metrics else None,
                deadline=self.ready_timeout,
                nursery=self._nursery,
                fuse_fd=rt.conn_fd,
                connection=self._connection_dir(key.id) if rt.conn_fd is not None else None,
            )
        except DaemonFailed as exc:
            rt.state, rt.message = "broken", exc.strerror
            if fresh:
                self._drop_connection(rt)
                with contextlib.suppress(OSError):
                    await self._unmount(entry.mountpoint, lazy=True)
            if exc.errno == errno.ETIMEDOUT:
                raise
            # say why when the cluster is the cause: the CSI caller answers UNAVAILABLE then
            why = await self._cluster_error(entry, token)
            if why is not None and why.errno in UNREACHABLE:
                raise _err(
                    why.errno, f"cluster {key.master_addrs} unreachable: {why.strerror}"
                ) from None
            raise
        if not mounts.is_fuse_mount(mounts.top_mount(entry.mountpoint)):
            with trio.CancelScope(shield=True):
                await daemon.stop(self.stop_grace)
            rt.state = "broken"
            rt.message = f"daemon reported ready but {entry.mountpoint} is no {mounts.FUSE_FSTYPE}"
            raise _err(errno.EIO, rt.message)
        self._adopt(entry, daemon)
        await self._save_token(key.id, token)
        await self.persist()

    def _connection_dir(self, key_id: str) -> str:
        return os.path.join(self.connections_dir, key_id)

    def _mount_connection(self, entry: Entry) -> int:
        key = entry.key
        options = kernel.fuse_options(
            key.master_addrs, key.fs_path, mount_options.parse_arg(key.options)
        )
        source = kernel.fsname(key.master_addrs, key.fs_path)
        conn_dir = self._connection_dir(key.id)
        return takeover.mount(entry.mountpoint, source, mounts.FUSE_FSTYPE, options, conn_dir)

    def _take_connection(self, entry: Entry) -> int | None:
        """A duplicate of an adopted daemon's descriptor, if its INIT was recorded (a daemon
        that mounted by itself, from an older mountd, cannot be taken over)."""
        if os.path.exists(os.path.join(self._connection_dir(entry.key.id), takeover.INIT_FILE)):
            return take_fuse_fd(entry.pid)
        return None

    def _drop_connection(self, rt: Runtime) -> None:
        """Close our duplicate: the connection ends with the last daemon holding it."""
        if rt.conn_fd is not None:
            with contextlib.suppress(OSError):
                os.close(rt.conn_fd)
            rt.conn_fd = None

    def _keeps_connection(self, entry: Entry, rt: Runtime) -> bool:
        """Whether a new daemon can take over the mount: we hold its descriptor and it is
        still the live mount at the mountpoint (nobody unmounted or aborted it)."""
        if rt.conn_fd is not None and mounts.is_fuse_mount(mounts.top_mount(entry.mountpoint)):
            return True
        self._drop_connection(rt)
        return False

    def _adopt(self, entry: Entry, daemon: Daemon) -> None:
        rt = self._rt(entry.key.id)
        rt.daemon, rt.state, rt.message, rt.sick = daemon, "running", "", 0
        rt.started_at = time.monotonic()
        entry.pid = daemon.pid
        daemon.start_watching(self._nursery)
        self._nursery.start_soon(self._watch, entry.key.id, daemon)

    async def _watch(self, key_id: str, daemon: Daemon) -> None:
        await daemon.exited.wait()
        rt = self.runtime.get(key_id)
        if rt is not None and rt.daemon is daemon and rt.state == "running":
            log.warning("daemon exited", extra=fields(key_id=key_id, pid=daemon.pid))
            self._wake.set()

    async def _release(self, entry: Entry) -> None:
        """The last reference went: stop the daemon now or after the linger."""
        rt = self._rt(entry.key.id)
        rt.linger_gen += 1
        if self.linger <= 0:
            await self._stop(entry)
        else:
            self._nursery.start_soon(self._linger_stop, entry.key.id, rt.linger_gen)

    async def _linger_stop(self, key_id: str, gen: int) -> None:
        await trio.sleep(self.linger)
        async with self.key_locks.hold(key_id):
            entry = self.table.entries.get(key_id)
            rt = self.runtime.get(key_id)
            if entry is not None and not entry.refs and rt is not None and rt.linger_gen == gen:
                await self._stop(entry)

    async def _stop(self, entry: Entry) -> None:
        """Stop the key's daemon and forget the key (caller holds the key lock)."""
        key_id = entry.key.id
        rt = self._rt(key_id)
        rt.state = "stopping"
        with trio.CancelScope(shield=True):
            if rt.daemon is not None:
                await rt.daemon.stop(self.stop_grace)
            with contextlib.suppress(OSError):
                await self._unmount(entry.mountpoint, lazy=True)
            self._drop_connection(rt)
            shutil.rmtree(self._connection_dir(key_id), ignore_errors=True)
            self.table.entries.pop(key_id, None)
            self.runtime.pop(key_id, None)
            await self.persist()
            for path in (self._token_path(key_id), self._metrics_file(key_id)):
                with contextlib.suppress(OSError):
                    os.unlink(path)
            with contextlib.suppress(OSError):
                await self._blocking(os.rmdir, entry.mountpoint)
        log.info("daemon stopped", extra=fields(key_id=key_id))

    # ------------------------------------------------------------ recovery

    async def _recover(
        self, entry: Entry, reason: str, token: str | None = None, cause: str = ""
    ) -> None:
        """Replace the key's daemon and re-bind every target (caller holds the key lock).

        Targets stay on the dead mount (applications see ENOTCONN, an honest error) until a
        new daemon answers; only then is each one swapped for a fresh bind.
        """
        key_id = entry.key.id
        rt = self._rt(key_id)
        cause = self._outage(rt, cause)
        log.warning("recovering", extra=fields(key_id=key_id, reason=reason, cause=cause))
        rt.state, rt.message = "recovering", reason
        crashed_fast = time.monotonic() - rt.started_at < CRASH_WINDOW
        old = rt.daemon
        rt.daemon = None
        if old is not None and old.alive:
            old.signal(signal.SIGKILL)
            with trio.move_on_after(5):
                await old.exited.wait()
        elif old is None and entry.pid and cmdline_matches(entry.pid, entry.mountpoint):
            with contextlib.suppress(ProcessLookupError):
                os.kill(entry.pid, signal.SIGKILL)
        taken = self._keeps_connection(entry, rt)
        if not taken:
            await self._unmount(entry.mountpoint, lazy=True)
        try:
            try:
                await self._start_daemon(entry, token)
            except OSError:
                if not taken:
                    raise
                # the kept connection did not work out: a mount of its own, as without it
                log.exception("takeover failed", extra=fields(key_id=key_id))
                taken = False
                self._drop_connection(rt)
                await self._unmount(entry.mountpoint, lazy=True)
                await self._start_daemon(entry, token)
        except OSError as exc:
            rt.state, rt.message = "broken", f"{reason}; restart failed: {exc.strerror or exc}"
            self._backoff(rt, True)
            self.recoveries.add(cause, "failed")
            self._tell_broken(entry, list(entry.refs.values()), rt.message)
            raise
        entry.restarts += 1
        # healthy only once the targets are served again, not when the daemon alone is up
        rt.state = "recovering"
        failed = await self._rebind(entry, list(entry.refs.values()), cause, taken)
        if rt.state == "recovering":
            rt.state = "running"
        # a crash loop backs off even when each replacement re-binds fine
        self._backoff(rt, failed or crashed_fast)
        await self.persist()
        log.info("recovered", extra=fields(key_id=key_id, pid=entry.pid, restarts=entry.restarts))

    async def _rebind(self, entry: Entry, refs: list[Ref], cause: str, taken: bool = False) -> bool:
        """Bind the live daemon's mount on top of each target; True if one failed.

        A target counts as served only once a statfs through the target itself answers.
        """
        rt = self._rt(entry.key.id)
        failed: list[tuple[Ref, str]] = []
        reset: set[str] = set()
        for ref in refs:
            try:
                if not self._bound(entry, ref) and await self._bind(entry, ref):
                    reset.add(ref.target)
                await self._blocking(os.statvfs, ref.target)
                rt.broken_targets.pop(ref.target, None)
            except OSError as exc:
                failed.append((ref, str(exc)))
                rt.broken_targets[ref.target] = f"re-binding failed: {exc}"
                log.error(
                    "re-bind failed",
                    extra=fields(target=ref.target, key_id=entry.key.id, error=str(exc)),
                )
        self.recoveries.add(cause, "failed" if failed else "ok")
        for ref, error in failed:
            self._tell_broken(entry, [ref], f"re-binding the volume failed: {error}")
        rebound = [r for r in refs if r.target not in rt.broken_targets]
        if not failed:
            self.recovery_seconds.observe(time.monotonic() - rt.broken_since, cause)
            rt.cause, rt.broken_since = "", 0.0
        for ref in rebound:
            rt.told_broken.discard(ref.target)
            restart = (
                f"; it was reset after {MAX_LAYERS} recoveries, so running containers keep the "
                "dead mount until they restart"
                if ref.target in reset
                else ""
            )
            how = (
                "a new daemon took it over; open files kept working"
                if taken and ref.target not in reset
                else f"was restored; files opened before that must be reopened{restart}"
            )
            self._tell(
                ref,
                "MountRecovered",
                f"the FUSE mount of volume {ref.volume_id} at {ref.target} broke ({cause}); {how}",
            )
        return bool(failed)

    def _outage(self, rt: Runtime, cause: str) -> str:
        """The cause of the current outage (the first one seen), started now if none was."""
        if not rt.broken_since:
            rt.broken_since = time.monotonic()
        rt.cause = rt.cause or cause or "daemon_exited"
        return rt.cause

    def _tell(self, ref: Ref, reason: str, message: str) -> None:
        if ref.pod_namespace and ref.pod_name:
            self.events.post_on_pod(ref.pod_namespace, ref.pod_name, reason, message)

    def _tell_broken(self, entry: Entry, refs: list[Ref], why: str) -> None:
        """Once per outage and target: its pod learns the mount could not be restored."""
        told = self._rt(entry.key.id).told_broken
        for ref in refs:
            if ref.target not in told:
                told.add(ref.target)
                self._tell(
                    ref,
                    "MountBroken",
                    f"the FUSE mount of volume {ref.volume_id} at {ref.target} is broken and "
                    f"could not be restored yet (retrying): {why}",
                )

    def _backoff(self, rt: Runtime, failed: bool) -> None:
        """Space out retries of what keeps failing; a success resets the pace."""
        if failed:
            rt.retry_at = time.monotonic() + rt.backoff
            rt.backoff = min(rt.backoff * 2, MAX_BACKOFF)
        else:
            rt.retry_at, rt.backoff = 0.0, 1.0

    async def _health_loop(self) -> None:
        while True:
            with trio.move_on_after(self.health_interval):
                await self._wake.wait()
            self._wake = trio.Event()
            async with trio.open_nursery() as checks:
                for key_id in list(self.table.entries):
                    checks.start_soon(self._check_logged, key_id)

    async def _check_logged(self, key_id: str) -> None:
        try:
            await self.check(key_id)
        except Exception:
            log.exception("health check failed", extra=fields(key_id=key_id))

    async def check(self, key_id: str) -> None:
        """One health check of a key; recovers it when its daemon or mount is gone."""
        entry = self.table.entries.get(key_id)
        rt = self.runtime.get(key_id)
        if entry is None or rt is None or self.key_locks.busy(key_id):
            return
        daemon = rt.daemon
        problem = await self._diagnose(entry, rt)
        lost = [] if problem else self._lost(entry)
        if problem is None and not lost:
            return
        if time.monotonic() < rt.retry_at:
            return  # backing off after a failed restart or re-bind
        async with self.key_locks.hold(key_id):
            if self.table.entries.get(key_id) is not entry or self.runtime.get(key_id) is not rt:
                return
            if problem and rt.daemon is not daemon:
                return  # replaced meanwhile (a publish found it dead too)
            if not entry.refs:
                await self._stop(entry)
                return
            if problem:
                with contextlib.suppress(OSError):
                    await self._recover(entry, problem)
                return
            lost = self._lost(entry)
            for ref in lost:
                log.warning("target lost its mount", extra=fields(target=ref.target))
            self._backoff(rt, await self._rebind(entry, lost, self._outage(rt, "target_lost")))

    def _lost(self, entry: Entry) -> list[Ref]:
        """References whose target lost its mount or still shows a dead one (mountd died
        in the middle of a recovery), or whose last re-bind failed."""
        broken = self._rt(entry.key.id).broken_targets
        table = mounts.read_mountinfo()
        source = mounts.top_mount(entry.mountpoint, table)
        return [
            r
            for r in entry.refs.values()
            if r.target in broken or not self._serves(mounts.top_mount(r.target, table), source)
        ]

    async def _diagnose(self, entry: Entry, rt: Runtime) -> str | None:
        if rt.state in ("broken", "starting") and rt.daemon is None:
            self._outage(rt, "daemon_exited")
            return rt.message or "daemon not running"
        if rt.daemon is None or not rt.daemon.alive:
            self._outage(rt, "daemon_exited")
            return "daemon exited"
        if not mounts.is_fuse_mount(mounts.top_mount(entry.mountpoint)):
            self._outage(rt, "mount_broken")
            return f"{entry.mountpoint} is no longer mounted"
        try:
            if not await self._statfs_while_alive(entry, rt.daemon):
                self._outage(rt, "daemon_exited")
                return "daemon exited"
        except OSError as exc:
            if exc.errno in DEAD:
                self._outage(rt, "mount_broken")
                return f"mount answers {errno.errorcode.get(exc.errno)}"
            if exc.errno not in SICK:
                raise
            rt.sick += 1
            rt.message = f"mount answered {errno.errorcode.get(exc.errno)} {rt.sick} times"
            # only failures while the cluster demonstrably answers count against the daemon
            if not await self._cluster_answers(entry):
                # a new daemon cannot do better, and the live one resumes when the cluster does
                rt.sick, rt.cluster_lost = 0, True
                rt.message = "cluster unreachable; keeping the daemon"
                log.warning("cluster unreachable", extra=fields(key_id=entry.key.id))
                return None
            if rt.cluster_lost:
                # the cluster is back, and this check may have failed in its outage: the
                # daemon gets a fresh chance (its open files survive only if it stays)
                rt.sick, rt.cluster_lost = 0, False
                rt.message = "cluster answers again; probing the daemon afresh"
                log.info("cluster answers again", extra=fields(key_id=entry.key.id))
                return None
            if rt.sick < SICK_LIMIT:
                return None
            self._outage(rt, "mount_broken")
            return rt.message
        rt.sick, rt.message, rt.cluster_lost = 0, "", False
        return None

    async def _statfs_while_alive(self, entry: Entry, daemon: Daemon) -> bool:
        """A statfs of the mount; False as soon as the daemon dies: on a kept connection the
        call waits for the next daemon, which this check would otherwise hold up."""
        answered, error = False, None
        async with trio.open_nursery() as nursery:

            async def died() -> None:
                await daemon.exited.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(died)
            try:
                await self._blocking(os.statvfs, entry.mountpoint)
                answered = True
            except OSError as exc:  # raised below: out of a nursery it would come grouped
                error = exc
            nursery.cancel_scope.cancel()
        if error is not None:
            raise error
        return answered

    async def _cluster_answers(self, entry: Entry, token: str | None = None) -> bool:
        """Whether the key's cluster answers (with `token`, else the stored one)."""
        return await self._cluster_error(entry, token) is None

    async def _cluster_error(self, entry: Entry, token: str | None = None) -> OSError | None:
        """Why the key's cluster does not answer (None when it does)."""
        from fusecsi.cluster.client import ClusterClient

        token = token or self._load_token(entry.key.id)
        with trio.move_on_after(self.probe_timeout):
            try:
                client = ClusterClient(
                    entry.key.master_addrs, token=token, timeout=self.probe_timeout
                )
                async with client:
                    await client.statfs()
                return None
            except Exception as raised:
                exc = unwrap(raised)
                return exc if isinstance(exc, OSError) else _err(errno.EIO, describe(exc))
        return _err(errno.ETIMEDOUT, f"no answer within {self.probe_timeout:g}s")

    # ------------------------------------------------------------ restart

    async def reconcile(self) -> None:
        """After a (re)start: adopt live daemons, mark dead ones for recovery, drop leftovers."""
        self.table.load()
        for entry in list(self.table.entries.values()):
            rt = self._rt(entry.key.id)
            if await self._adoptable(entry):
                rt.conn_fd = self._take_connection(entry)
                self._adopt(entry, Daemon(entry.pid))
                log.info("adopted daemon", extra=fields(key_id=entry.key.id, pid=entry.pid))
            else:
                # the health loop's first round recovers it (or stops it if unused)
                rt.daemon, rt.state, rt.message = (
                    None,
                    "broken",
                    "daemon lost while mountd was down",
                )
        known_targets = {t for e in self.table.entries.values() for t in e.refs}
        known_mounts = {e.mountpoint for e in self.table.entries.values()}
        for leftover in mounts.mounts_under(self.kubelet_dir):
            if mounts.is_fuse_mount(leftover) and leftover.mountpoint not in known_targets:
                log.warning("removing leftover bind", extra=fields(target=leftover.mountpoint))
                with contextlib.suppress(OSError):
                    await self._unmount(leftover.mountpoint, lazy=True)
        for leftover in mounts.mounts_under(self.mounts_dir):
            if leftover.mountpoint not in known_mounts:
                log.warning(
                    "removing leftover daemon mount", extra=fields(path=leftover.mountpoint)
                )
                with contextlib.suppress(OSError):
                    await self._unmount(leftover.mountpoint, lazy=True)
        await self.persist()
        self._wake.set()

    async def _adoptable(self, entry: Entry) -> bool:
        if not entry.pid or not cmdline_matches(entry.pid, entry.mountpoint):
            return False
        if not mounts.is_fuse_mount(mounts.top_mount(entry.mountpoint)):
            return False
        try:
            await self._blocking(os.statvfs, entry.mountpoint)
        except OSError:
            return False
        return True

    # ------------------------------------------------------------ queries

    async def stats(self, target) -> dict:
        target = await self.resolve_target(target, errno.EINVAL)
        found = self.table.by_target(target)
        if found is None:
            raise _err(errno.ENOENT, f"target {target} is not published")
        entry, ref = found
        rt = self._rt(entry.key.id)
        answer = {
            "volume_id": ref.volume_id,
            "key": entry.key.id,
            "used_bytes": None,
            "max_bytes": None,
            "used_inodes": None,
            "max_inodes": None,
            # the cluster's statfs through the target: totals when there is no quota
            "total_bytes": None,
            "free_bytes": None,
            "total_inodes": None,
            "free_inodes": None,
            "healthy": True,
            "message": "",
        }
        if rt.state != "running":
            answer.update(healthy=False, message=f"mount is {rt.state}: {rt.message}")
            return answer
        if target in rt.broken_targets or not self._bound(entry, ref):
            why = rt.broken_targets.get(target) or f"{target} is not mounted"
            answer.update(healthy=False, message=why)
            self._wake.set()
            return answer
        try:
            raw = await self._blocking(os.getxattr, target, QUOTA_XATTR)
            quota = json.loads(raw)
        except OSError as exc:
            if exc.errno != errno.ENODATA:
                answer.update(healthy=False, message=f"reading quota: {exc.strerror or exc}")
                if exc.errno in DEAD:
                    self._wake.set()
        except ValueError as exc:
            answer.update(message=f"unreadable quota: {exc}")
        else:
            for name in ("used_bytes", "max_bytes", "used_inodes", "max_inodes"):
                value = quota.get(name)
                answer[name] = value if isinstance(value, int) else None
        if answer["healthy"]:
            with contextlib.suppress(OSError):  # totals are a bonus; health was just read
                fs = await self._blocking(os.statvfs, target)
                answer.update(
                    total_bytes=fs.f_blocks * fs.f_frsize,
                    free_bytes=fs.f_bavail * fs.f_frsize,
                    total_inodes=fs.f_files,
                    free_inodes=fs.f_favail,
                )
        return answer

    def list(self) -> list[dict]:
        rows = []
        # also called from the metrics thread: read only, never create runtime state
        for key_id, entry in sorted(list(self.table.entries.items())):
            rt = self.runtime.get(key_id) or Runtime()
            rows.append(
                {
                    "key": key_id,
                    "master_addrs": entry.key.master_addrs,
                    "fs_path": entry.key.fs_path,
                    "options": entry.key.options,
                    "mountpoint": entry.mountpoint,
                    "pid": rt.daemon.pid if rt.daemon is not None else None,
                    "state": rt.state,
                    "message": rt.message,
                    "restarts": entry.restarts,
                    "refs": [
                        {
                            "volume_id": r.volume_id,
                            "target": r.target,
                            "subpath": r.subpath,
                            "readonly": r.readonly,
                            "healthy": r.target not in rt.broken_targets,
                        }
                        for r in sorted(entry.refs.values(), key=lambda r: r.target)
                    ],
                }
            )
        return rows
