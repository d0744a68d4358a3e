"""Directories whose every name this mount knows, for `entry-timeout` seconds.

The kernel sends a LOOKUP before every create, and for a new name the answer ("absent")
costs a cluster round trip. A directory this mount has just made is known to be empty, and
one just read to its end is known in full; the names this mount creates and removes there
keep the set exact. Until `entry-timeout` seconds after the set was last checked against
the cluster, a name outside it is answered "absent" here: the staleness bound the kernel
already has for a negative entry it caches, for names created elsewhere.

A read of a directory (a `Scan`) holds every name present when it began, because the
cluster's readdir cookies follow creation order and survive removals. Changes this mount
makes while a scan runs are replayed onto its result; a change whose outcome is unknown
(an error, a timeout) spoils the scan and forgets the directory's set.

A set in steady use is checked again before it expires (`due`): one read of the directory
costs about as much as ENTRIES_PER_LOOKUP names' worth of lookups, so it is read again only
when it answered at least that share of its names since it was last checked.
"""

from __future__ import annotations

import time

MAX_NAMES = 50_000  # beyond this a directory is not worth the memory: ask the cluster
SWEEP_AT = 64  # listings held before expired ones are swept out
ENTRIES_PER_LOOKUP = 25  # readdir entries that cost as much as one lookup (measured)
MIN_USES = 8


class Listing:
    __slots__ = ("names", "until", "uses", "refreshing")

    def __init__(self, names: set[bytes], until: float) -> None:
        self.names = names
        self.until = until  # time.monotonic() after which it is not trusted
        self.uses = 0  # names answered "absent" from it
        self.refreshing = False


class Scan:
    """One read of a directory from its first entry; `names` fills as pages arrive."""

    __slots__ = ("ino", "started", "names", "changes", "spoiled", "next_cookie")

    def __init__(self, ino: int) -> None:
        self.ino = ino
        self.started = time.monotonic()
        self.names: set[bytes] = set()
        self.changes: list[tuple[bool, bytes]] = []  # (added?, name) made here meanwhile
        self.spoiled = False
        self.next_cookie = 0


class Listings:
    __slots__ = ("ttl", "_dirs", "_scans")

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._dirs: dict[int, Listing] = {}
        self._scans: dict[int, list[Scan]] = {}

    def establish(self, ino: int, names: set[bytes], checked_at: float) -> None:
        """`names` is all of directory `ino` as of `checked_at` (time.monotonic)."""
        if self.ttl <= 0 or len(names) > MAX_NAMES:
            return
        if len(self._dirs) >= SWEEP_AT:
            now = time.monotonic()
            for stale in [i for i, listing in self._dirs.items() if listing.until <= now]:
                del self._dirs[stale]
        self._dirs[ino] = Listing(names, checked_at + self.ttl)

    def absent(self, ino: int, name: bytes) -> float:
        """Seconds for which `name` is known not to be in directory `ino` (0: not known)."""
        listing = self._dirs.get(ino)
        if listing is None:
            return 0.0
        left = listing.until - time.monotonic()
        if left <= 0:
            del self._dirs[ino]
            return 0.0
        if name in listing.names:
            return 0.0
        listing.uses += 1
        return left

    def due(self, ino: int) -> bool:
        """True (once) when directory `ino`'s set should be read again before it expires."""
        listing = self._dirs.get(ino)
        if (
            listing is None
            or listing.refreshing
            or listing.until - time.monotonic() > self.ttl / 2
            or listing.uses < MIN_USES + len(listing.names) // ENTRIES_PER_LOOKUP
        ):
            return False
        listing.refreshing = True
        return True

    def added(self, ino: int, name: bytes) -> None:
        self._changed(ino, True, name)
        listing = self._dirs.get(ino)
        if listing is not None:
            listing.names.add(name)
            if len(listing.names) > MAX_NAMES:
                del self._dirs[ino]

    def removed(self, ino: int, name: bytes) -> None:
        self._changed(ino, False, name)
        listing = self._dirs.get(ino)
        if listing is not None:
            listing.names.discard(name)

    def forget(self, ino: int) -> None:
        """The outcome of a change in directory `ino` is not known."""
        for scan in self._scans.get(ino, ()):
            scan.spoiled = True
        self._dirs.pop(ino, None)

    def _changed(self, ino: int, added: bool, name: bytes) -> None:
        for scan in self._scans.get(ino, ()):
            scan.changes.append((added, name))

    # -- reads of a whole directory

    def begin(self, ino: int) -> Scan:
        scan = Scan(ino)
        self._scans.setdefault(ino, []).append(scan)
        return scan

    def page(self, scan: Scan, cookie: int, names, next_cookie: int | None) -> bool:
        """The page read at `cookie` (`next_cookie` None: the last one); False when the
        scan cannot go on (pages out of order, too many names: it is abandoned)."""
        if cookie != scan.next_cookie or scan.spoiled:
            self.end(scan)
            return False
        scan.names.update(names)
        if next_cookie is None:
            self.end(scan)
            for added, name in scan.changes:
                (scan.names.add if added else scan.names.discard)(name)
            self.establish(scan.ino, scan.names, scan.started)
            return False
        if len(scan.names) > MAX_NAMES:
            self.end(scan)
            return False
        scan.next_cookie = next_cookie
        return True

    def end(self, scan: Scan) -> None:
        """Stop following changes for `scan` (finished or abandoned)."""
        scans = self._scans.get(scan.ino)
        if scans is not None and scan in scans:
            scans.remove(scan)
            if not scans:
                del self._scans[scan.ino]
        listing = self._dirs.get(scan.ino)
        if listing is not None:
            listing.refreshing = False

    def __contains__(self, ino: int) -> bool:
        return ino in self._dirs
