"""Inode numbers and what the kernel knows about them.

Cluster inode numbers are the kernel's inode numbers, except that the cluster inode of
fs-path is presented as FUSE's ROOT_INODE (1). The cluster's own root (also 1) is never
inside the served subtree, so the two numbers cannot collide.
"""

from __future__ import annotations

ROOT_INODE = 1


class InodeMap:
    __slots__ = ("base",)

    def __init__(self, base: int) -> None:
        self.base = base

    def to_cluster(self, ino: int) -> int:
        return self.base if ino == ROOT_INODE else ino

    def to_kernel(self, ino: int) -> int:
        return ROOT_INODE if ino == self.base else ino


class LookupCounts:
    """How many references the kernel holds to each inode (lookup minus forget).

    Every reply that hands the kernel an entry (lookup, create, mkdir, mknod, symlink, link,
    and each readdirplus entry) adds one; `forget` takes them away. The root is never
    counted: the kernel holds it for the life of the mount.
    """

    __slots__ = ("_counts",)

    def __init__(self) -> None:
        self._counts: dict[int, int] = {}

    def add(self, ino: int, n: int = 1) -> None:
        if ino != ROOT_INODE:
            self._counts[ino] = self._counts.get(ino, 0) + n

    def forget(self, ino: int, n: int) -> bool:
        """Drop n references; True when the kernel no longer knows the inode."""
        count = self._counts.get(ino)
        if count is None:
            return ino != ROOT_INODE
        if count > n:
            self._counts[ino] = count - n
            return False
        del self._counts[ino]
        return True

    def get(self, ino: int) -> int:
        return self._counts.get(ino, 0)

    def __contains__(self, ino: int) -> bool:
        return ino in self._counts

    def __len__(self) -> int:
        return len(self._counts)
