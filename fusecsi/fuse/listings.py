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

A listing also keeps the attributes a read of the directory returned for files with one
link, so a lookup of an existing name is answered here too, with the kernel's cache times
cut to what is left of `entry-timeout` / `attr-timeout` since that read: again the bound
the kernel's own caches have. Every change this mount makes to a file's attributes (size,
mode, owner, times, links, xattrs) drops them (`touched`), and so does every change of the
name; directories are always asked about (their attributes move with every child).

A set in steady use is checked again before it expires (`due`): one read of the directory
costs about as much as ENTRIES_PER_LOOKUP names' worth of lookups, so it is read again only
when it answered at least that share of its names since it was last checked.
"""

from __future__ import annotations

import stat
import time

MAX_NAMES = 20_000  # beyond this a directory is not worth the memory: ask the cluster
SWEEP_AT = 64  # listings held before expired ones are swept out
ENTRIES_PER_LOOKUP = 25  # readdir entries that cost as much as one lookup (measured)
MIN_USES = 8


class Listing:
    __slots__ = ("names", "until", "uses", "refreshing")

    def __init__(self, names: dict[bytes, int | None], until: float) -> None:
        self.names = names  # name -> inode whose attributes are kept (None: not kept)
        self.until = until  # time.monotonic() after which it is not trusted
        self.uses = 0  # lookups answered from it
        self.refreshing = False


class Scan:
    """One read of a directory from its first entry; `names` fills as pages arrive."""

    __slots__ = ("ino", "started", "names", "attrs", "changes", "spoiled", "next_cookie")

    def __init__(self, ino: int) -> None:
        self.ino = ino
        self.started = time.monotonic()
        self.names: dict[bytes, int | None] = {}
        self.attrs: dict[int, object] = {}  # ino -> Attr, files with one link
        self.changes: list[tuple[int, object]] = []  # made here meanwhile, see Listings
        self.spoiled = False
        self.next_cookie = 0


ADDED, REMOVED, TOUCHED = range(3)  # kinds of change a scan replays


class Listings:
    __slots__ = ("ttl", "attr_ttl", "_dirs", "_scans", "_attrs")

    def __init__(self, ttl: float, attr_ttl: float = 0.0) -> None:
        self.ttl = ttl
        self.attr_ttl = attr_ttl
        self._dirs: dict[int, Listing] = {}
        self._scans: dict[int, list[Scan]] = {}
        self._attrs: dict[int, tuple[object, float]] = {}  # ino -> (Attr, read at)

    def establish(
        self, ino: int, names: dict[bytes, int | None], checked_at: float, attrs=None
    ) -> None:
        """`names` is all of directory `ino` as of `checked_at` (time.monotonic)."""
        if self.ttl <= 0 or len(names) > MAX_NAMES:
            return
        if len(self._dirs) >= SWEEP_AT:
            now = time.monotonic()
            for stale in [i for i, listing in self._dirs.items() if listing.until <= now]:
                self._drop(stale)
        self._drop(ino)
        self._dirs[ino] = Listing(names, checked_at + self.ttl)
        if attrs and self.attr_ttl > 0:
            for file_ino, attr in attrs.items():
                self._attrs[file_ino] = (attr, checked_at)

    def known(self, ino: int, name: bytes):
        """What this mount knows of `name` in directory `ino` without asking: None, or
        (Attr or None for "absent", seconds left for the entry, seconds left for the Attr)."""
        listing = self._dirs.get(ino)
        if listing is None:
            return None
        now = time.monotonic()
        left = listing.until - now
        if left <= 0:
            self._drop(ino)
            return None
        if name not in listing.names:
            listing.uses += 1
            return None, left, 0.0
        kept = self._attrs.get(listing.names[name])
        if kept is None:
            return None
        attr_left = kept[1] + self.attr_ttl - now
        if attr_left <= 0:
            return None
        listing.uses += 1
        return kept[0], left, attr_left

    def absent(self, ino: int, name: bytes) -> float:
        """Seconds for which `name` is known not to be in directory `ino` (0: not known)."""
        found = self.known(ino, name)
        return found[1] if found is not None and found[0] is None else 0.0

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
        """`name` now exists in directory `ino` (its attributes are not kept)."""
        self._changed(ino, ADDED, name)
        listing = self._dirs.get(ino)
        if listing is not None:
            self._attrs.pop(listing.names.get(name), None)  # a file replaced by a rename
            listing.names[name] = None
            if len(listing.names) > MAX_NAMES:
                self._drop(ino)

    def removed(self, ino: int, name: bytes) -> None:
        self._changed(ino, REMOVED, name)
        listing = self._dirs.get(ino)
        if listing is not None:
            self._attrs.pop(listing.names.pop(name, None), None)

    def touched(self, ino: int) -> None:
        """This mount changed (or tried to change) the attributes of file `ino`."""
        self._attrs.pop(ino, None)
        for scans in self._scans.values():
            for scan in scans:
                scan.changes.append((TOUCHED, ino))

    def forget(self, ino: int) -> None:
        """The outcome of a change in directory `ino` is not known."""
        for scan in self._scans.get(ino, ()):
            scan.spoiled = True
        self._drop(ino)

    def _drop(self, ino: int) -> None:
        listing = self._dirs.pop(ino, None)
        if listing is not None:
            attrs = self._attrs
            for file_ino in listing.names.values():
                if file_ino is not None:
                    attrs.pop(file_ino, None)

    def _changed(self, ino: int, kind: int, name: bytes) -> None:
        for scan in self._scans.get(ino, ()):
            scan.changes.append((kind, name))

    # -- reads of a whole directory

    def begin(self, ino: int) -> Scan:
        scan = Scan(ino)
        self._scans.setdefault(ino, []).append(scan)
        return scan

    def page(self, scan: Scan, cookie: int, entries, next_cookie: int | None) -> bool:
        """The (name, Attr, cookie) entries read at `cookie` (`next_cookie` None: the last
        page); False when the scan is over (done, or pages out of order, too many names)."""
        if cookie != scan.next_cookie or scan.spoiled:
            self.end(scan)
            return False
        names, attrs = scan.names, scan.attrs
        for name, attr, _ in entries:
            if attr.nlink == 1 and not stat.S_ISDIR(attr.mode):
                names[name] = attr.ino
                attrs[attr.ino] = attr
            else:
                names[name] = None
        if next_cookie is None:
            self.end(scan)
            for kind, what in scan.changes:
                if kind == TOUCHED:
                    attrs.pop(what, None)
                elif kind == REMOVED:
                    attrs.pop(names.pop(what, None), None)
                else:
                    attrs.pop(names.get(what), None)
                    names[what] = None
            self.establish(scan.ino, names, scan.started, attrs)
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
