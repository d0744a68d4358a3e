"""Cluster calls made on behalf of the kernel: one deadline, retries, errno mapping.

Every call gets `io-timeout` seconds in total. Within it, idempotent calls are retried
while the cluster is unreachable (a master or worker restarting); calls that change the
namespace are retried only when the request cannot have been delivered (connection
refused). When the time is up the application gets EIO instead of hanging.
"""

from __future__ import annotations

import errno
import logging

import trio
from pyfuse3 import FUSEError

from fusecsi.logs import fields

log = logging.getLogger(__name__)

# Errors that say "the cluster is not reachable right now", not "the request is wrong".
TRANSIENT = frozenset(
    {
        errno.ETIMEDOUT,
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.EPIPE,
        errno.ENOTCONN,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ESHUTDOWN,
        errno.EAGAIN,
    }
)
# A request refused at connect time never reached the server: safe to send again.
NOT_DELIVERED = frozenset({errno.ECONNREFUSED})
FIRST_BACKOFF = 0.05
MAX_BACKOFF = 1.0


class ClusterCalls:
    def __init__(self, io_timeout: float) -> None:
        self.io_timeout = io_timeout

    async def __call__(self, fn, *args, idempotent: bool = True, **kwargs):
        """`await fn(*args, **kwargs)`; failures become FUSEError with the cluster's errno."""
        delay = FIRST_BACKOFF
        with trio.move_on_after(self.io_timeout):
            while True:
                try:
                    return await fn(*args, **kwargs)
                except (OSError, ExceptionGroup) as raised:
                    exc = unwrap(raised)
                    if not isinstance(exc, OSError):
                        raise
                    code = exc.errno or errno.EIO
                    if code not in TRANSIENT:
                        raise FUSEError(code) from None
                    if not idempotent and code not in NOT_DELIVERED:
                        log.warning("cluster call failed", extra=_fields(fn, exc))
                        raise FUSEError(errno.EIO) from None
                    log.info("cluster unreachable, retrying", extra=_fields(fn, exc))
                await trio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF)
        log.warning("cluster call timed out", extra=fields(call=_name(fn)))
        raise FUSEError(errno.EIO)


def unwrap(exc: BaseException) -> BaseException:
    """The one exception inside (nested) single-member groups that nurseries wrap it in."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _name(fn) -> str:
    return getattr(fn, "__name__", repr(fn))


def _fields(fn, exc: OSError) -> dict:
    return fields(call=_name(fn), errno=errno.errorcode.get(exc.errno or 0, "?"))
