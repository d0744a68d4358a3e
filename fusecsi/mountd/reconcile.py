"""The persisted table and what a (re)started mountd makes of it: adopt live daemons, mark
dead ones for recovery, remove leftover mounts of its own."""

from __future__ import annotations

import contextlib
import logging
import os

import trio

from fusecsi.logs import fields
from fusecsi.mountd import mounts
from fusecsi.mountd.daemons import Daemon, cmdline_matches
from fusecsi.mountd.table import DEFAULT_ENGINE, Entry, write_atomic

log = logging.getLogger("fusecsi.mountd.supervisor")


class Reconcile:
    """Persistence and restart of the Supervisor (fusecsi/mountd/supervisor.py)."""

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

    async def reconcile(self) -> None:
        """After a (re)start: adopt live daemons, mark dead ones for recovery, drop leftovers."""
        self.table.load()
        for entry in list(self.table.entries.values()):
            state = self.key_state(entry.key.id)
            try:
                adoptable = await self._adoptable(entry)
            except OSError as exc:  # an engine this mountd does not have
                adoptable = False
                log.error("cannot serve key", extra=fields(key_id=entry.key.id, error=str(exc)))
            if adoptable:
                if self.engine_of(entry).takeover:
                    state.conn = self._take_connection(entry)
                self._adopt(entry, Daemon(entry.pid))
                log.info("adopted daemon", extra=fields(key_id=entry.key.id, pid=entry.pid))
            else:
                # the health loop's first round recovers it (or stops it if unused)
                state.daemon, state.state = None, "broken"
                state.message = "daemon lost while mountd was down"
        known_targets = {t for e in self.table.entries.values() for t in e.refs}
        known_mounts = {e.mountpoint for e in self.table.entries.values()}
        for leftover in mounts.mounts_under(self.kubelet_dir):
            if self._leftover_bind(leftover) and leftover.mountpoint not in known_targets:
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

    def _leftover_bind(self, mount) -> bool:
        """Whether a mount in the kubelet dir is a bind mountd made: the default engine's
        fstype (its daemons are ours alone), or the device of one of mountd's own daemon
        mounts (another engine's fstype may be another driver's)."""
        if mount is None:
            return False
        if mount.fstype == self.engines(DEFAULT_ENGINE).fstype:
            return True
        ours = {m.device for m in mounts.mounts_under(self.mounts_dir)}
        return mount.device in ours

    async def _adoptable(self, entry: Entry) -> bool:
        fstype = self.engine_of(entry).fstype
        if not entry.pid or not cmdline_matches(entry.pid, entry.mountpoint):
            return False
        if not mounts.is_mount_of(mounts.top_mount(entry.mountpoint), fstype):
            return False
        try:
            await self._blocking(os.statvfs, entry.mountpoint)
        except OSError:
            return False
        return True
