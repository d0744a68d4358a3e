"""Directories whose every name this mount knows, for `entry-timeout` seconds.

The kernel sends a LOOKUP before every create, and for a new name the answer ("absent")
costs a cluster round trip. A directory this mount has just made is known to be empty, and
one just read to its end is known in full; the names this mount creates and removes there
keep the set exact. Until `entry-timeout` seconds after the set was last checked against
the cluster, a name outside it is answered "absent" here: the staleness bound the kernel
already has for a negative entry it caches, for names created elsewhere.

Only changes that the cluster confirmed are applied; a change whose outcome is unknown (an
error, a timeout) forgets the directory's set. `epoch` moves on every change made through
this mount, so a listing read in several pages is trusted only if nothing changed while it
was being read.
"""

from __future__ import annotations

import time

MAX_NAMES = 50_000  # beyond this a directory is not worth the memory: ask the cluster
SWEEP_AT = 64  # listings held before expired ones are swept out


class Listings:
    __slots__ = ("ttl", "epoch", "_dirs")

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self.epoch = 0
        self._dirs: dict[int, tuple[set[bytes], float]] = {}  # ino -> (names, trusted until)

    def establish(self, ino: int, names: set[bytes], checked_at: float) -> None:
        """`names` is all of directory `ino` as of `checked_at` (time.monotonic)."""
        if self.ttl > 0 and len(names) <= MAX_NAMES:
            if len(self._dirs) >= SWEEP_AT:
                now = time.monotonic()
                for stale in [i for i, (_, until) in self._dirs.items() if until <= now]:
                    del self._dirs[stale]
            self._dirs[ino] = (names, checked_at + self.ttl)

    def absent(self, ino: int, name: bytes) -> float:
        """Seconds for which `name` is known not to be in directory `ino` (0: not known)."""
        listing = self._dirs.get(ino)
        if listing is None:
            return 0.0
        left = listing[1] - time.monotonic()
        if left <= 0:
            del self._dirs[ino]
            return 0.0
        return 0.0 if name in listing[0] else left

    def added(self, ino: int, name: bytes) -> None:
        self.epoch += 1
        listing = self._dirs.get(ino)
        if listing is not None:
            listing[0].add(name)
            if len(listing[0]) > MAX_NAMES:
                del self._dirs[ino]

    def removed(self, ino: int, name: bytes) -> None:
        self.epoch += 1
        listing = self._dirs.get(ino)
        if listing is not None:
            listing[0].discard(name)

    def forget(self, ino: int) -> None:
        """The outcome of a change in directory `ino` is not known."""
        self.epoch += 1
        self._dirs.pop(ino, None)

    def __contains__(self, ino: int) -> bool:
        return ino in self._dirs
