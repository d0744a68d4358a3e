"""Daemon lifecycle of a key: start (from the engine's Launch), adopt, watch, linger, stop,
and the /dev/fuse connection mountd keeps for engines that allow takeover."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import time

import trio

from fusecsi.engines.options import parse_options
from fusecsi.fuse import takeover
from fusecsi.logs import fields
from fusecsi.mountd import fdpass, keeper, mounts
from fusecsi.mountd.daemons import Daemon, DaemonFailed, spawn, take_fuse_fd
from fusecsi.mountd.keystate import UNREACHABLE, KeyState, err
from fusecsi.mountd.table import Entry

log = logging.getLogger("fusecsi.mountd.supervisor")


class Lifecycle:
    """Daemon start/stop of the Supervisor (fusecsi/mountd/supervisor.py)."""

    def _private_dir(self, key_id: str) -> str:
        return os.path.join(self.private_dir, key_id)

    def _metrics_file(self, key_id: str) -> str:
        return os.path.join(self.metrics_dir, f"{key_id}.prom")

    def _connection_dir(self, key_id: str) -> str:
        return os.path.join(self.connections_dir, key_id)

    def _live_mount(self, entry: Entry) -> bool:
        state = self.key_states.get(entry.key.id)
        return (
            state is not None
            and state.daemon is not None
            and state.daemon.alive
            and state.state == "running"
            and mounts.is_mount_of(mounts.top_mount(entry.mountpoint), self.engine_of(entry).fstype)
        )

    async def _start_daemon(self, entry: Entry, secrets: dict[str, str] | None = None) -> None:
        """Start the key's daemon: on the kept connection when there is one (takeover),
        else on a new mount of its own. `secrets` (else the kept ones) are saved once the
        daemon is up with them."""
        key, state = entry.key, self.key_state(entry.key.id)
        engine = self.engine_of(entry)
        secrets = secrets or self._load_secrets(key.id)
        cluster = self.cluster_of(entry, secrets)
        state.state = "starting"
        fresh = state.conn is None
        passing = self._passes_fd(engine)
        if fresh:
            os.makedirs(entry.mountpoint, mode=0o755, exist_ok=True)
            if mounts.top_mount(entry.mountpoint) is not None:
                await self._unmount(entry.mountpoint, lazy=True)
            if self.takeover and engine.takeover and not passing:
                fd = await self._blocking(self._mount_connection, entry, cluster)
                state.conn = keeper.hold(fd)
        server = await self._fd_server(entry) if passing else None
        if server is not None:
            if fresh:
                server.reset()
            server.expect()
        # a client that takes descriptors itself gets it through the listener; ours gets a
        # duplicate for as long as the start takes (mountd holds none otherwise: keeper.py)
        fuse_fd = None
        try:
            if state.conn is not None and not passing:
                fuse_fd = state.conn.take()
            launch = engine.launch(
                cluster, key.fs_path, parse_options(key.options), entry.mountpoint
            )
            daemon = await spawn(
                launch,
                fstype=engine.fstype,
                mountpoint=entry.mountpoint,
                private_dir=self._private_dir(key.id),
                log_path=os.path.join(self.logs_dir, f"{key.id}.log"),
                metrics_file=self._metrics_file(key.id) if self.daemon_metrics else None,
                deadline=self.ready_timeout,
                nursery=self._nursery,
                fuse_fd=fuse_fd,
                connection=(
                    self._connection_dir(key.id)
                    if state.conn is not None or server is not None
                    else None
                ),
            )
        except (DaemonFailed, ValueError) as exc:
            message = exc.strerror if isinstance(exc, OSError) else str(exc)
            state.state, state.message = "broken", message
            if fresh:
                self._drop_connection(state)
                with contextlib.suppress(OSError):
                    await self._unmount(entry.mountpoint, lazy=True)
            if not isinstance(exc, OSError):  # the engine refused what the key holds
                raise err(errno.EINVAL, message) from None
            if exc.errno == errno.ETIMEDOUT:
                raise
            # say why when the cluster is the cause: the CSI caller answers UNAVAILABLE then
            why = await self._cluster_error(entry, secrets)
            if why is not None and why.errno in UNREACHABLE:
                raise err(why.errno, f"cluster {key.address} unreachable: {why.strerror}") from None
            raise
        finally:
            if fuse_fd is not None:  # the daemon has its own now
                os.close(fuse_fd)
        if not mounts.is_mount_of(mounts.top_mount(entry.mountpoint), engine.fstype):
            with trio.CancelScope(shield=True):
                await daemon.stop(self.stop_grace)
            state.state = "broken"
            state.message = f"daemon reported ready but {entry.mountpoint} is no {engine.fstype}"
            raise err(errno.EIO, state.message)
        if server is not None and fresh and not await server.wait_sent():
            log.warning(
                "daemon passed no FUSE descriptor: its death will need a re-bind",
                extra=fields(key_id=key.id, pid=daemon.pid),
            )
        self._adopt(entry, daemon)
        await self._save_secrets(entry, secrets)
        await self.persist()

    def _passes_fd(self, engine) -> bool:
        """Whether the engine's client hands mountd its descriptor (fdpass.py) to keep."""
        return self.takeover and getattr(engine, "fd_passing", False)

    async def _fd_server(self, entry: Entry) -> fdpass.FdServer | None:
        """The key's descriptor listener, started on first use; None if it cannot listen
        (the daemon then mounts by itself and its death needs a re-bind)."""
        state = self.key_state(entry.key.id)
        if state.fd_server is None:
            server = fdpass.FdServer(entry.key.id, self._connection_dir(entry.key.id), state)
            try:
                await self._nursery.start(server.run)
            except OSError as exc:
                log.error("cannot listen for descriptors", extra=fields(error=str(exc)))
                return None
            state.fd_server = server
        return state.fd_server

    def _mount_connection(self, entry: Entry, cluster) -> int:
        key = entry.key
        engine = self.engine_of(entry)
        source, options = engine.kernel_mount(cluster, key.fs_path, parse_options(key.options))
        conn_dir = self._connection_dir(key.id)
        return takeover.mount(entry.mountpoint, source, engine.fstype, options, conn_dir)

    async def _serve_fds(self, server: fdpass.FdServer) -> None:
        try:
            await server.run()
        except OSError as exc:
            log.error("cannot listen for descriptors", extra=fields(error=str(exc)))

    def _take_connection(self, entry: Entry) -> keeper.Kept | None:
        """A duplicate of an adopted daemon's descriptor, kept, if its INIT (or, for a client that
        passes its descriptor, its setting) was recorded: a daemon that mounted by itself,
        from an older mountd, cannot be taken over."""
        conn_dir = self._connection_dir(entry.key.id)
        if self._passes_fd(self.engine_of(entry)):
            # its successor asks the listener for the descriptor; it starts soon, long
            # before a successor could
            state = self.key_state(entry.key.id)
            if state.fd_server is None:
                state.fd_server = fdpass.FdServer(entry.key.id, conn_dir, state)
                self._nursery.start_soon(self._serve_fds, state.fd_server)
            recorded = fdpass.read_setting(conn_dir) is not None
        else:
            recorded = os.path.exists(os.path.join(conn_dir, takeover.INIT_FILE))
        fd = take_fuse_fd(entry.pid) if recorded else None
        return keeper.hold(fd) if fd is not None else None

    def _drop_connection(self, state: KeyState) -> None:
        """Let our duplicate go: the connection ends with the last daemon holding it."""
        if state.conn is not None:
            state.conn.close()
            state.conn = None

    def _keeps_connection(self, entry: Entry, state: KeyState) -> bool:
        """Whether a new daemon can take over the mount: we hold its descriptor and it is
        still the live mount at the mountpoint (nobody unmounted or aborted it)."""
        fstype = self.engine_of(entry).fstype
        if (
            state.conn is not None
            and state.conn.alive()
            and mounts.is_mount_of(mounts.top_mount(entry.mountpoint), fstype)
        ):
            return True
        self._drop_connection(state)
        return False

    def _adopt(self, entry: Entry, daemon: Daemon) -> None:
        state = self.key_state(entry.key.id)
        state.daemon, state.state, state.message, state.sick = daemon, "running", "", 0
        state.started_at = time.monotonic()
        entry.pid = daemon.pid
        daemon.start_watching(self._nursery)
        self._nursery.start_soon(self._wake_on_exit, entry.key.id, daemon)

    async def _wake_on_exit(self, key_id: str, daemon: Daemon) -> None:
        """A running daemon's exit starts a health round at once, not at the next tick."""
        await daemon.exited.wait()
        state = self.key_states.get(key_id)
        if state is not None and state.daemon is daemon and state.state == "running":
            log.warning("daemon exited", extra=fields(key_id=key_id, pid=daemon.pid))
            self._wake.set()

    async def _release(self, entry: Entry) -> None:
        """The last reference went: stop the daemon now or after the linger."""
        state = self.key_state(entry.key.id)
        state.linger_gen += 1
        if self.linger <= 0:
            await self._stop(entry)
        else:
            self._nursery.start_soon(self._linger_stop, entry.key.id, state.linger_gen)

    async def _linger_stop(self, key_id: str, gen: int) -> None:
        await trio.sleep(self.linger)
        async with self.key_locks.hold(key_id):
            entry = self.table.entries.get(key_id)
            state = self.key_states.get(key_id)
            if (
                entry is not None
                and not entry.refs
                and state is not None
                and state.linger_gen == gen
            ):
                await self._stop(entry)

    async def _stop(self, entry: Entry) -> None:
        """Stop the key's daemon and forget the key (caller holds the key lock)."""
        key_id = entry.key.id
        state = self.key_state(key_id)
        state.state = "stopping"
        with trio.CancelScope(shield=True):
            if state.daemon is not None:
                await state.daemon.stop(self.stop_grace)
            with contextlib.suppress(OSError):
                await self._unmount(entry.mountpoint, lazy=True)
            self._drop_connection(state)
            if state.fd_server is not None:
                state.fd_server.close()
            shutil.rmtree(self._connection_dir(key_id), ignore_errors=True)
            shutil.rmtree(self._private_dir(key_id), ignore_errors=True)
            self.table.entries.pop(key_id, None)
            self.key_states.pop(key_id, None)
            await self.persist()
            for path in (self._secrets_path(key_id), self._metrics_file(key_id)):
                with contextlib.suppress(OSError):
                    os.unlink(path)
            with contextlib.suppress(OSError):
                await self._blocking(os.rmdir, entry.mountpoint)
        log.info("daemon stopped", extra=fields(key_id=key_id))
