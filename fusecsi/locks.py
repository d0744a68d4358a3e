"""Locks by name, created on first use and dropped when nobody holds or waits for them; and
taking a lock at once when it is free."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio


class KeyedLocks:
    def __init__(self) -> None:
        self._slots: dict[str, list] = {}  # name -> [lock, users]

    @asynccontextmanager
    async def hold(self, name: str) -> AsyncIterator[None]:
        slot = self._slots.setdefault(name, [trio.Lock(), 0])
        slot[1] += 1
        try:
            async with slot[0]:
                yield
        finally:
            slot[1] -= 1
            if slot[1] == 0:
                del self._slots[name]

    def busy(self, name: str) -> bool:
        return name in self._slots


async def acquire(lock: trio.Lock | trio.Semaphore) -> None:
    """`await lock.acquire()`, without a schedule point when the lock is free: for paths
    someone is waiting on (the kernel, for the reply to a FUSE write), where yielding would
    let unrelated tasks run first."""
    try:
        lock.acquire_nowait()
    except trio.WouldBlock:
        await lock.acquire()
