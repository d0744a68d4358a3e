"""The errors of the RPC layer: what a caller catches and what travels in a reply."""

from __future__ import annotations

import errno


class RPCError(OSError):
    """An error with an errno, raised by a handler or received from the other side."""

    def __init__(self, code: int | str, message: str = "") -> None:
        if isinstance(code, str):
            code = getattr(errno, code, errno.EIO) if code.isupper() else errno.EIO
        super().__init__(code, message or errno.errorcode.get(code, "error"))

    @property
    def errno_name(self) -> str:
        return errno.errorcode.get(self.errno, "EIO")


class RPCUnavailable(RPCError):
    """No connection could be made or kept (ECONNREFUSED) or no reply came (ETIMEDOUT)."""


class ForeignCluster(RPCError):
    """A server that belongs to another cluster than the one first seen (ESTALE)."""


class ProtocolError(Exception):
    """The peer sent something that is not a valid frame: the connection is dropped."""


class ReadTimeout(Exception):
    """No frame within the time given: `idle` when not a byte of one had arrived."""

    def __init__(self, idle: bool) -> None:
        super().__init__("idle" if idle else "stalled in the middle of a frame")
        self.idle = idle


def error_payload(exc: BaseException) -> list:
    if isinstance(exc, OSError) and exc.errno:
        name = errno.errorcode.get(exc.errno, "EIO")
        return [name, str(exc.strerror or exc)]
    if isinstance(exc, TypeError | ValueError | KeyError | IndexError):
        return ["EINVAL", f"bad arguments: {exc}"]
    return ["EIO", f"internal error: {type(exc).__name__}"]
