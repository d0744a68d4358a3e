"""What a person reads when something fails: one line, errno name first, no traceback."""

from __future__ import annotations

import errno
import logging
import sys


def unwrap(exc: BaseException) -> BaseException:
    """The error inside the exception groups trio's nurseries wrap it in (the first one,
    when there are several)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


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
