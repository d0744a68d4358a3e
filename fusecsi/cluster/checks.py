"""Argument checks shared by the master's and the workers' RPC methods (errors are EINVAL)."""

from __future__ import annotations

import errno
from typing import Any


def fail(code: int, message: str) -> OSError:
    return OSError(code, message)


def check_int(value: Any, what: str = "value", lo: int = 0, hi: int = (1 << 63) - 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise fail(errno.EINVAL, f"{what} must be an integer in [{lo}, {hi}]")
    return value


def opt_int(value: Any, what: str, lo: int = 0) -> int | None:
    return None if value is None else check_int(value, what, lo)
