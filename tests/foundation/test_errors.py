"""fusecsi/errors.py: one line per failure, and trio's ExceptionGroups reduced to the one
real exception (the helpers every role uses instead of local workarounds)."""

from __future__ import annotations

import errno

import pytest
import trio

from fusecsi.errors import run_all, unwrap, unwrapped


def test_unwrap_finds_the_exception_inside_nested_groups():
    leaf = OSError(errno.EIO, "boom")
    assert unwrap(ExceptionGroup("outer", [ExceptionGroup("inner", [leaf])])) is leaf
    assert unwrap(leaf) is leaf


async def test_a_nursery_failure_leaves_unwrapped_as_itself():
    async def fail():
        raise OSError(errno.ENOENT, "gone")

    with pytest.raises(OSError, match="gone") as raised:
        with unwrapped():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fail)
    assert not isinstance(raised.value, BaseExceptionGroup)


async def test_run_all_lets_every_call_finish_and_raises_one_failure():
    finished = []

    async def slow_ok():
        await trio.sleep(0.05)
        finished.append("slow")
        return 1

    async def fails_fast():
        raise OSError(errno.ENOENT, "stale")

    async def fails_later():
        await trio.sleep(0.01)
        raise OSError(errno.EIO, "worse")

    assert await run_all([slow_ok, slow_ok]) == [1, 1]
    with pytest.raises(OSError, match="stale"):  # the first to fail, by default
        await run_all([slow_ok, fails_fast, fails_later])
    assert finished == ["slow", "slow", "slow"]  # a failure cancelled nothing
    with pytest.raises(OSError, match="worse"):
        await run_all(
            [fails_fast, fails_later], pick=lambda e: min(e, key=lambda x: x.errno == errno.ENOENT)
        )
    with pytest.raises(ExceptionGroup):  # what `catch` leaves out is trio's to report
        await run_all([fails_fast], catch=KeyError)
