"""Rolling daemons to new code: each key's daemon hands its mount over to a daemon started
from this mountd's build, with no I/O error (the kernel connection stays; nothing is
re-bound).

A key's *build* is what its daemon runs: fusecsi's version, a digest of fusecsi's sources
and of the installed distributions (name and version: pyfuse3, trio, an engine's binary
shipped as a wheel), and a digest of the executable its Launch starts (the interpreter, an
engine's binary). The version alone does not change between two images of one release, and
a container cannot see its image id; this digest changes exactly when what the daemon would
run changes, and two images with the same code share it (no roll for nothing). It covers
more than the daemon needs (mountd's own modules too): a needless roll costs a short stall,
a missed one leaves old code running.

The table records the build each daemon was started from. A restarted mountd rolls the
daemons it adopted from another build, one key at a time, once it serves; the `roll` API
method (`fusecsi mountd roll`) rolls every key, or one, at once.

A handover, under the key lock (publish, unpublish and the health check of the key wait):
the engine's `hand_over(pid, connection_dir, grace)` if it has one, else, for an engine
whose daemon serves the /dev/fuse connection mountd keeps, SIGTERM (the daemon commits every
acknowledged write and exits without unmounting); then the successor starts on the kept
connection. The old daemon's exit is no crash: no recovery, no Event, no backoff. A daemon
that does not leave within the grace keeps serving (failed); a successor that does not
start falls back to recovery (a fresh mount, re-bound), so the key is never left dead.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import importlib.metadata
import logging
import os
import shutil
import signal
from pathlib import Path

import trio

import fusecsi
from fusecsi.engines.options import parse_options
from fusecsi.logs import fields
from fusecsi.mountd.keystate import err
from fusecsi.mountd.table import Entry

log = logging.getLogger("fusecsi.mountd.supervisor")

# how long a daemon may take to leave after it was asked to hand over: it first commits
# what it buffered, each commit bounded by its io-timeout (default 30 s)
ROLL_GRACE = 60.0


@functools.cache
def _code_digest() -> bytes:
    """fusecsi's sources and the installed distributions, read once per process."""
    digest = hashlib.sha256(fusecsi.__version__.encode())
    root = Path(fusecsi.__file__).parent
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    dists = sorted(f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions())
    digest.update("\n".join(dists).encode())
    return digest.digest()


@functools.cache
def _file_digest(path: str, identity: tuple[int, int, int]) -> bytes:
    """The content digest of an executable; `identity` (inode, size, mtime) keys the cache."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.digest()


def build_id(executable: str | None) -> str:
    """`<version>+<digest>` of fusecsi's code and `executable` (see the module docstring)."""
    digest = hashlib.sha256(_code_digest())
    if executable:
        with contextlib.suppress(OSError):
            info = os.stat(executable)
            digest.update(_file_digest(executable, (info.st_ino, info.st_size, info.st_mtime_ns)))
    return f"{fusecsi.__version__}+{digest.hexdigest()[:16]}"


def answer(key_id: str, result: str, message: str = "", **extra) -> dict:
    return {"key": key_id, "result": result, "message": message, **extra}


class Rolling:
    """Build records and handovers of the Supervisor (fusecsi/mountd/supervisor.py)."""

    async def build_of(self, entry: Entry, secrets=None) -> str:
        """The build a daemon of `entry` started now would run."""
        executable = None
        try:
            cluster = self.cluster_of(entry, secrets)
            launch = self.engine_of(entry).launch(
                cluster, entry.key.fs_path, parse_options(entry.key.options), entry.mountpoint
            )
            executable = shutil.which(launch.argv[0])
        except (OSError, ValueError, LookupError, TypeError):
            pass  # the start itself will say what is wrong
        return await trio.to_thread.run_sync(build_id, executable)

    async def _start_daemon(self, entry: Entry, secrets=None) -> None:
        """Lifecycle's start, recording the build the daemon runs (persisted with its pid)."""
        previous, entry.build = entry.build, await self.build_of(entry, secrets)
        try:
            await super()._start_daemon(entry, secrets)
        except BaseException:
            entry.build = previous
            raise

    # ------------------------------------------------------------ API

    async def roll(self, key=None, grace=None) -> list[dict]:
        """Hand every key's daemon (or `key`'s) over to this build, one key at a time;
        per key: rolled, skipped or failed, and why."""
        if key is not None and (not isinstance(key, str) or key not in self.table.entries):
            raise err(errno.ENOENT, f"no key {key!r} in mountd's table")
        if grace is None:
            grace = self.roll_grace
        if not isinstance(grace, int | float) or isinstance(grace, bool) or not 0 < grace <= 600:
            raise err(errno.EINVAL, "grace must be a number of seconds in (0, 600]")
        keys = [key] if key is not None else sorted(self.table.entries)
        return [await self.roll_key(key_id, float(grace)) for key_id in keys]

    async def roll_adopted_daemons(self, adopted: list[str]) -> None:
        """In the background once mountd serves: roll the adopted daemons of another build."""
        await self.serving.wait()
        counts = {"current": 0, "rolled": 0, "skipped": 0, "failed": 0}
        for key_id in adopted:
            entry = self.table.entries.get(key_id)
            if entry is None:
                continue
            own = await self.build_of(entry)
            if entry.build == own:
                counts["current"] += 1
                continue
            log.info(
                "rolling an adopted daemon",
                extra=fields(key_id=key_id, build=entry.build or "unknown", to=own),
            )
            try:
                done = await self.roll_key(key_id, self.roll_grace)
            except Exception as exc:  # a bug here must not stop mountd: log it, go on
                log.exception("roll failed", extra=fields(key_id=key_id))
                done = answer(key_id, "failed", str(exc))
            counts[done["result"]] += 1
            level = logging.WARNING if done["result"] == "failed" else logging.INFO
            log.log(level, "roll", extra=fields(**done))
        log.info("adopted daemons checked", extra=fields(**counts))

    # ------------------------------------------------------------ one key

    async def roll_key(self, key_id: str, grace: float) -> dict:
        done = await self._roll_key(key_id, grace)
        self.rolls.add(done["result"])
        return done

    async def _roll_key(self, key_id: str, grace: float) -> dict:
        async with self.key_locks.hold(key_id):
            entry = self.table.entries.get(key_id)
            state = self.key_states.get(key_id)
            if entry is None or state is None:
                return answer(key_id, "skipped", "the key went meanwhile")
            why = self._cannot_roll(entry, state)
            if why:
                return answer(key_id, "skipped", why, pid=entry.pid, build=entry.build)
            old = state.daemon
            before = {"old_pid": old.pid, "old_build": entry.build}
            # once the daemon is asked to leave, the successor must start: mountd stopping
            # now would leave the mount without a daemon (every step has a deadline)
            with trio.CancelScope(shield=True):
                state.state, state.message = "rolling", "handing over to a new daemon"
                try:
                    refused = await self._ask_to_leave(entry, old.pid, grace)
                    if refused is None:
                        with trio.move_on_after(grace):
                            await old.exited.wait()
                        if old.alive:
                            refused = (
                                f"the daemon did not exit within {grace:g}s; it was left "
                                "running (the health check replaces it once it exits)"
                            )
                    else:
                        refused += "; it keeps serving"
                    if refused is not None:
                        log.warning("handover failed", extra=fields(key_id=key_id, why=refused))
                        return answer(key_id, "failed", refused, **before)
                    state.daemon = None
                    return {**before, **await self._start_successor(entry, state)}
                finally:
                    if state.state == "rolling":
                        state.state, state.message = "running", ""

    def _cannot_roll(self, entry: Entry, state) -> str:
        """Why this key's daemon is not handed over ("" when it can be)."""
        try:
            engine = self.engine_of(entry)
        except OSError as exc:
            return str(exc.strerror or exc)
        if getattr(engine, "hand_over", None) is None and not engine.takeover:
            return (
                f"engine {engine.name} cannot hand over; it keeps its daemon until its last "
                "volume goes"
            )
        if state.daemon is None or not state.daemon.alive or state.state != "running":
            return f"the daemon is {state.state or 'not running'}; recovery replaces it"
        if not entry.refs:
            return "unused: it stops after its linger"
        if not self._keeps_connection(entry, state):
            return (
                "mountd keeps no /dev/fuse connection of this mount (mounted by an older "
                "mountd, or --no-takeover); it keeps its daemon until its last volume goes"
            )
        return ""

    async def _ask_to_leave(self, entry: Entry, pid: int, grace: float) -> str | None:
        """The engine's handover, else SIGTERM; why it was refused, or None."""
        engine = self.engine_of(entry)
        hand_over = getattr(engine, "hand_over", None)
        if hand_over is None:
            self.key_state(entry.key.id).daemon.signal(signal.SIGTERM)
            return None
        with trio.move_on_after(grace + self.stop_grace):
            try:
                await hand_over(pid, self._connection_dir(entry.key.id), grace)
            except OSError as exc:
                return f"the daemon refused to hand over: {exc.strerror or exc}"
            return None
        return f"the engine's handover did not answer within {grace + self.stop_grace:g}s"

    async def _start_successor(self, entry: Entry, state) -> dict:
        """The new daemon on the kept connection; recovery (a fresh mount) if it fails."""
        key_id = entry.key.id
        why = ""
        if self._keeps_connection(entry, state):
            try:
                await self._start_daemon(entry)
            except OSError as exc:
                why = str(exc.strerror or exc)
        else:
            why = "the mount was gone when the old daemon left"
        if not why:
            log.info("rolled", extra=fields(key_id=key_id, pid=entry.pid, build=entry.build))
            return answer(key_id, "rolled", "", new_pid=entry.pid, build=entry.build)
        log.error("successor failed; recovering", extra=fields(key_id=key_id, error=why))
        try:
            taken = await self._recover(entry, f"handover failed: {why}", cause="handover_failed")
        except OSError as exc:
            outcome = f"recovery failed too ({exc.strerror or exc}); it retries"
        else:
            outcome = (
                "recovery started another daemon on the kept connection"
                if taken
                else "recovery mounted it afresh and re-bound its targets"
            )
        return answer(
            key_id,
            "failed",
            f"the new daemon did not start ({why}); {outcome}",
            new_pid=entry.pid,
            build=entry.build,
        )
