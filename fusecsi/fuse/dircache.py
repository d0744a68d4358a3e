"""Directory attributes remembered by the daemon for `attr-timeout` seconds.

Every create or unlink makes the kernel drop its cached attributes of the parent
directory, and the next permission check (default_permissions) asks the daemon for them:
one extra cluster round trip per metadata operation. A change this mount made itself does
not alter the directory's mode or owner, so the daemon answers from here, with the times
and link count adjusted, and refetches once the entry is older than `attr-timeout` (the
same staleness bound the kernel's own cache has for changes made elsewhere).
"""

from __future__ import annotations

import time


class DirAttrs:
    __slots__ = ("ttl", "_entries")

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._entries: dict[int, tuple] = {}  # ino -> (Attr, expires at)

    def put(self, attr) -> None:
        if self.ttl > 0:
            self._entries[attr.ino] = (attr, time.monotonic() + self.ttl)

    def get(self, ino: int):
        entry = self._entries.get(ino)
        if entry is None:
            return None
        if entry[1] < time.monotonic():
            del self._entries[ino]
            return None
        return entry[0]

    def changed(self, ino: int, subdirs: int = 0) -> None:
        """This mount added or removed an entry of directory `ino` (`subdirs`: its link
        count changes by that many)."""
        entry = self._entries.get(ino)
        if entry is not None:
            a, now = entry[0], time.time_ns()  # Attr's fields in order, cheaper than replace()
            attr = type(a)(
                a.ino, a.mode, a.nlink + subdirs, a.uid, a.gid, a.size, a.atime_ns, now, now
            )
            self._entries[ino] = (attr, entry[1])

    def drop(self, ino: int) -> None:
        self._entries.pop(ino, None)
