"""Read-only answers of the Supervisor: a target's stats and the table as rows."""

from __future__ import annotations

import contextlib
import errno
import os

from fusecsi.mountd.keystate import DEAD, KeyState, err


class Queries:
    """stats and list of the Supervisor (fusecsi/mountd/supervisor.py)."""

    async def stats(self, target) -> dict:
        target = await self.resolve_target(target, errno.EINVAL)
        found = self.table.by_target(target)
        if found is None:
            raise err(errno.ENOENT, f"target {target} is not published")
        entry, ref = found
        state = self.key_state(entry.key.id)
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
        if state.state not in ("running", "rolling"):  # a handover is a short stall
            answer.update(healthy=False, message=f"mount is {state.state}: {state.message}")
            return answer
        if target in state.broken_targets or not self._bound(entry, ref):
            why = state.broken_targets.get(target) or f"{target} is not mounted"
            answer.update(healthy=False, message=why)
            self._wake.set()
            return answer
        try:
            # the target is the volume's directory as bound from the key's mount
            usage = await self._blocking(self.engine_of(entry).usage, target)
        except OSError as exc:
            if exc.errno == errno.EBADMSG:
                answer.update(message=exc.strerror or str(exc))
            elif exc.errno != errno.ENODATA:
                answer.update(healthy=False, message=f"reading usage: {exc.strerror or exc}")
                if exc.errno in DEAD:
                    self._wake.set()
        else:
            answer.update(
                used_bytes=usage.used_bytes,
                max_bytes=usage.total_bytes,
                used_inodes=usage.used_inodes,
                max_inodes=usage.total_inodes,
            )
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
        # also called from the metrics thread: read only, never create key state
        for key_id, entry in sorted(list(self.table.entries.items())):
            state = self.key_states.get(key_id) or KeyState()
            rows.append(
                {
                    "key": key_id,
                    "engine": entry.key.engine,
                    "cluster": entry.key.address,
                    "fs_path": entry.key.fs_path,
                    "options": entry.key.options,
                    "mountpoint": entry.mountpoint,
                    "pid": state.daemon.pid if state.daemon is not None else None,
                    "state": state.state,
                    "message": state.message,
                    "restarts": entry.restarts,
                    "build": entry.build,
                    "refs": [
                        {
                            "volume_id": r.volume_id,
                            "target": r.target,
                            "subpath": r.subpath,
                            "readonly": r.readonly,
                            "healthy": r.target not in state.broken_targets,
                        }
                        for r in sorted(entry.refs.values(), key=lambda r: r.target)
                    ],
                }
            )
        return rows
