"""Health and recovery: the health loop, a key's diagnosis, daemon replacement, re-binds,
backoff, and the Events that tell a pod about its mount."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import time

import trio

from fusecsi.logs import fields
from fusecsi.mountd import mounts, publishing
from fusecsi.mountd.daemons import Daemon, cmdline_matches
from fusecsi.mountd.keystate import DEAD, SICK, SICK_LIMIT, KeyState, err
from fusecsi.mountd.table import Entry, Ref

log = logging.getLogger("fusecsi.mountd.supervisor")

MAX_BACKOFF = 30.0
# A daemon that dies sooner than this after starting is crash-looping: its next
# replacement waits (with growing backoff) instead of following at once.
CRASH_WINDOW = 10.0


class Recovery:
    """Health checks and recovery of the Supervisor (fusecsi/mountd/supervisor.py)."""

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
        """One health check of a key; recovers it when its daemon or mount is gone.

        A key that is busy (a publish, unpublish or recovery holds it) is checked next
        round; the diagnosis changes the key's state, so it runs under the key lock.
        """
        if self.key_locks.busy(key_id):
            return
        async with self.key_locks.hold(key_id):
            entry = self.table.entries.get(key_id)
            state = self.key_states.get(key_id)
            if entry is None or state is None:
                return
            problem = await self._diagnose(entry, state)
            lost = [] if problem else self._lost(entry)
            if problem is None and not lost:
                return
            if time.monotonic() < state.retry_at:
                return  # backing off after a failed restart or re-bind
            if not entry.refs:
                await self._stop(entry)
                return
            if problem:
                with contextlib.suppress(OSError):
                    await self._recover(entry, problem)
                return
            for ref in lost:
                log.warning("target lost its mount", extra=fields(target=ref.target))
            failed = await self._rebind(entry, lost, self._outage(state, "target_lost"))
            self._backoff(state, failed)

    def _lost(self, entry: Entry) -> list[Ref]:
        """References whose target lost its mount or still shows a dead one (mountd died
        in the middle of a recovery), or whose last re-bind failed."""
        broken = self.key_state(entry.key.id).broken_targets
        table = mounts.read_mountinfo()
        source = mounts.top_mount(entry.mountpoint, table)
        return [
            r
            for r in entry.refs.values()
            if r.target in broken
            or not self._serves(entry, mounts.top_mount(r.target, table), source)
        ]

    async def _diagnose(self, entry: Entry, state: KeyState) -> str | None:
        if state.state in ("broken", "starting") and state.daemon is None:
            self._outage(state, "daemon_exited")
            return state.message or "daemon not running"
        if state.daemon is None or not state.daemon.alive:
            self._outage(state, "daemon_exited")
            return "daemon exited"
        if not mounts.is_mount_of(mounts.top_mount(entry.mountpoint), self.engine_of(entry).fstype):
            self._outage(state, "mount_broken")
            return f"{entry.mountpoint} is no longer mounted"
        try:
            if not await self._statfs_while_alive(entry, state.daemon):
                self._outage(state, "daemon_exited")
                return "daemon exited"
        except OSError as exc:
            if exc.errno in DEAD:
                self._outage(state, "mount_broken")
                return f"mount answers {errno.errorcode.get(exc.errno)}"
            if exc.errno not in SICK:
                raise
            state.sick += 1
            state.message = f"mount answered {errno.errorcode.get(exc.errno)} {state.sick} times"
            # only failures while the cluster demonstrably answers count against the daemon
            if await self._cluster_error(entry) is not None:
                # a new daemon cannot do better, and the live one resumes when the cluster does
                state.sick, state.cluster_lost = 0, True
                state.message = "cluster unreachable; keeping the daemon"
                log.warning("cluster unreachable", extra=fields(key_id=entry.key.id))
                return None
            if state.cluster_lost:
                # the cluster is back, and this check may have failed in its outage: the
                # daemon gets a fresh chance (its open files survive only if it stays)
                state.sick, state.cluster_lost = 0, False
                state.message = "cluster answers again; probing the daemon afresh"
                log.info("cluster answers again", extra=fields(key_id=entry.key.id))
                return None
            if state.sick < SICK_LIMIT:
                return None
            self._outage(state, "mount_broken")
            return state.message
        state.sick, state.message, state.cluster_lost = 0, "", False
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

    async def _cluster_error(self, entry: Entry, secrets=None) -> OSError | None:
        """Why the key's cluster does not answer (None when it does), asked through its
        engine with `secrets`, else the kept ones."""
        cluster = self.cluster_of(entry, secrets)
        with trio.move_on_after(self.probe_timeout):
            try:
                return await self.engine_of(entry).probe(cluster)
            except OSError as exc:
                return exc
        return err(errno.ETIMEDOUT, f"no answer within {self.probe_timeout:g}s")

    async def _recover(self, entry: Entry, reason: str, secrets=None, cause: str = "") -> bool:
        """Replace the key's daemon and re-bind every target (caller holds the key lock);
        True when the new daemon took the kept connection over (nothing was re-bound).

        Targets stay on the dead mount (applications see ENOTCONN, an honest error) until a
        new daemon answers; only then is each one swapped for a fresh bind.
        """
        key_id = entry.key.id
        state = self.key_state(key_id)
        cause = self._outage(state, cause)
        log.warning("recovering", extra=fields(key_id=key_id, reason=reason, cause=cause))
        state.state, state.message = "recovering", reason
        crashed_fast = time.monotonic() - state.started_at < CRASH_WINDOW
        old = state.daemon
        state.daemon = None
        if old is not None and old.alive:
            old.signal(signal.SIGKILL)
            with trio.move_on_after(5):
                await old.exited.wait()
        elif old is None and entry.pid and cmdline_matches(entry.pid, entry.mountpoint):
            with contextlib.suppress(ProcessLookupError):
                os.kill(entry.pid, signal.SIGKILL)
        taken = self._keeps_connection(entry, state)
        if not taken:
            await self._unmount(entry.mountpoint, lazy=True)
        try:
            try:
                await self._start_daemon(entry, secrets)
            except OSError:
                if not taken:
                    raise
                # the kept connection did not work out: a mount of its own, as without it
                log.exception("takeover failed", extra=fields(key_id=key_id))
                taken = False
                self._drop_connection(state)
                await self._unmount(entry.mountpoint, lazy=True)
                await self._start_daemon(entry, secrets)
        except OSError as exc:
            state.state = "broken"
            state.message = f"{reason}; restart failed: {exc.strerror or exc}"
            self._backoff(state, True)
            self.recoveries.add(cause, "failed")
            self._post_broken(entry, list(entry.refs.values()), state.message)
            raise
        entry.restarts += 1
        # healthy only once the targets are served again, not when the daemon alone is up
        state.state = "recovering"
        failed = await self._rebind(entry, list(entry.refs.values()), cause, taken)
        if state.state == "recovering":
            state.state = "running"
        # a crash loop backs off even when each replacement re-binds fine
        self._backoff(state, failed or crashed_fast)
        await self.persist()
        log.info("recovered", extra=fields(key_id=key_id, pid=entry.pid, restarts=entry.restarts))
        return taken

    async def _rebind(self, entry: Entry, refs: list[Ref], cause: str, taken: bool = False) -> bool:
        """Bind the live daemon's mount on top of each target; True if one failed.

        A target counts as served only once a statfs through the target itself answers.
        """
        state = self.key_state(entry.key.id)
        failed: list[tuple[Ref, str]] = []
        reset: set[str] = set()
        for ref in refs:
            try:
                if not self._bound(entry, ref) and await self._bind(entry, ref):
                    reset.add(ref.target)
                await self._blocking(os.statvfs, ref.target)
                state.broken_targets.pop(ref.target, None)
            except OSError as exc:
                failed.append((ref, str(exc)))
                state.broken_targets[ref.target] = f"re-binding failed: {exc}"
                log.error(
                    "re-bind failed",
                    extra=fields(target=ref.target, key_id=entry.key.id, error=str(exc)),
                )
        self.recoveries.add(cause, "failed" if failed else "ok")
        for ref, error in failed:
            self._post_broken(entry, [ref], f"re-binding the volume failed: {error}")
        rebound = [r for r in refs if r.target not in state.broken_targets]
        if not failed:
            self.recovery_seconds.observe(time.monotonic() - state.broken_since, cause)
            state.cause, state.broken_since = "", 0.0
        for ref in rebound:
            state.told_broken.discard(ref.target)
            restart = (
                f"; it was reset after {publishing.MAX_LAYERS} recoveries, so running containers keep the "
                "dead mount until they restart"
                if ref.target in reset
                else ""
            )
            how = (
                "a new daemon took it over; open files kept working"
                if taken and ref.target not in reset
                else f"was restored; files opened before that must be reopened{restart}"
            )
            self._post_pod_event(
                ref,
                "MountRecovered",
                f"the FUSE mount of volume {ref.volume_id} at {ref.target} broke ({cause}); {how}",
            )
        return bool(failed)

    def _outage(self, state: KeyState, cause: str) -> str:
        """The cause of the current outage (the first one seen), started now if none was."""
        if not state.broken_since:
            state.broken_since = time.monotonic()
        state.cause = state.cause or cause or "daemon_exited"
        return state.cause

    def _post_pod_event(self, ref: Ref, reason: str, message: str) -> None:
        if ref.pod_namespace and ref.pod_name:
            self.events.post_on_pod(ref.pod_namespace, ref.pod_name, reason, message)

    def _post_broken(self, entry: Entry, refs: list[Ref], why: str) -> None:
        """Once per outage and target: its pod learns the mount could not be restored."""
        told = self.key_state(entry.key.id).told_broken
        for ref in refs:
            if ref.target not in told:
                told.add(ref.target)
                self._post_pod_event(
                    ref,
                    "MountBroken",
                    f"the FUSE mount of volume {ref.volume_id} at {ref.target} is broken and "
                    f"could not be restored yet (retrying): {why}",
                )

    def _backoff(self, state: KeyState, failed: bool) -> None:
        """Space out retries of what keeps failing; a success resets the pace."""
        if failed:
            state.retry_at = time.monotonic() + state.backoff
            state.backoff = min(state.backoff * 2, MAX_BACKOFF)
        else:
            state.retry_at, state.backoff = 0.0, 1.0
