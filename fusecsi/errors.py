"""What a person reads when something fails: one line, errno name first, no traceback.

And the one real exception out of the ExceptionGroups trio's nurseries wrap failures in:
`unwrap` (an exception caught), `unwrapped` (a nursery whose failure should leave as
itself), `run_all` (calls at once, each to its end, one failure raised).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import trio


def unwrap(exc: BaseException) -> BaseException:
    """The error inside the exception groups trio's nurseries wrap it in (the first one,
    when there are several)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


@contextlib.contextmanager
def unwrapped() -> Iterator[None]:
    """Around a nursery: its failure leaves as itself, not as a group."""
    try:
        yield
    except BaseExceptionGroup as group:
        raise unwrap(group) from None


def _first(failures: list[BaseException]) -> BaseException:
    return failures[0]


async def run_all(
    calls: Sequence[Callable[[], Awaitable[Any]]],
    *,
    catch: type[BaseException] | tuple[type[BaseException], ...] = Exception,
    pick: Callable[[list[Any]], BaseException] = _first,
) -> list:
    """Run the calls at once, every one to its end (a failure does not cancel the others),
    and return their results in order. When some failed with `catch`, the one `pick` chooses
    among the failures (in the order they happened) is raised as itself, not as a group."""
    results: list = [None] * len(calls)
    failures: list[BaseException] = []

    async def one(i: int) -> None:
        try:
            results[i] = await calls[i]()
        except catch as exc:
            failures.append(exc)

    async with trio.open_nursery() as nursery:
        for i in range(len(calls)):
            nursery.start_soon(one, i)
    if failures:
        raise pick(failures)
    return results


def describe(exc: BaseException) -> str:
    """One line: `[path: ]ERRNO: message` for an OSError, the message of a ValueError, the
    type and message of anything else."""
    if isinstance(exc, OSError) and exc.errno:
        name = errno.errorcode.get(exc.errno, f"errno {exc.errno}")
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{name}: {exc.strerror or exc}"
    if isinstance(exc, ValueError | OSError):
        return str(exc)
    return f"internal error: {type(exc).__name__}: {exc}"


def report(command: str, exc: BaseException) -> None:
    """`fusecsi <command>: <describe(exc)>`: a JSON line when the role logs (its stderr is
    JSON lines only), else plain text."""
    from fusecsi.logs import active

    line = f"fusecsi {command}: {describe(exc)}"
    if active():
        logging.getLogger("fusecsi").error(line)
    else:
        print(line, file=sys.stderr)
