"""Cluster calls made on behalf of the kernel: one deadline, retries, errno mapping.

Every call gets `io-timeout` seconds in total. Within it, idempotent calls are retried
while the cluster is unreachable (a master or worker restarting); calls that change the
namespace are retried only when the request cannot have been delivered (connection
refused). When the time is up the application gets EIO instead of hanging.

A single master call (a ClusterClient method marked `@one_master_call` where it is defined)
gives up on its own within the client's timeout, which the daemon sets to io-timeout: its
first attempt runs without a cancel scope of ours (a deadline costs more than the rest of
the wrapper), and only a retry gets one, with the deadline counted from the first attempt.
"""

from __future__ import annotations

import errno
import logging

import trio
from pyfuse3 import FUSEError

from fusecsi.cluster.writebehind import TRANSIENT  # "not reachable now", not "refused"
from fusecsi.errors import unwrap
from fusecsi.logs import fields

log = logging.getLogger(__name__)

# A request refused at connect time never reached the server: safe to send again.
NOT_DELIVERED = frozenset({errno.ECONNREFUSED})
FIRST_BACKOFF = 0.05
MAX_BACKOFF = 1.0


class ClusterCalls:
    def __init__(self, io_timeout: float) -> None:
        self.io_timeout = io_timeout

    async def __call__(self, fn, *args, idempotent: bool = True, **kwargs):
        """`await fn(*args, **kwargs)`; failures become FUSEError with the cluster's errno."""
        start = trio.current_time()
        retry = False
        if getattr(fn, "one_master_call", False):
            try:
                return await fn(*args, **kwargs)
            except (OSError, ExceptionGroup) as raised:
                _retryable(fn, raised, idempotent)
            retry = True
        delay = FIRST_BACKOFF
        with trio.move_on_at(start + self.io_timeout):
            while True:
                if retry:
                    await trio.sleep(delay)
                    delay = min(delay * 2, MAX_BACKOFF)
                retry = True
                try:
                    return await fn(*args, **kwargs)
                except (OSError, ExceptionGroup) as raised:
                    _retryable(fn, raised, idempotent)
        log.warning("cluster call timed out", extra=fields(call=_name(fn)))
        raise FUSEError(errno.EIO)


def _retryable(fn, raised: BaseException, idempotent: bool) -> None:
    """Return when the failed call may be sent again; raise what the kernel gets otherwise."""
    exc = unwrap(raised)
    if not isinstance(exc, OSError):
        raise raised
    code = exc.errno or errno.EIO
    if code not in TRANSIENT:
        raise FUSEError(code) from None
    if not idempotent and code not in NOT_DELIVERED:
        log.warning("cluster call failed", extra=_fields(fn, exc))
        raise FUSEError(errno.EIO) from None
    log.info("cluster unreachable, retrying", extra=_fields(fn, exc))


def _name(fn) -> str:
    return getattr(fn, "__name__", repr(fn))


def _fields(fn, exc: OSError) -> dict:
    return fields(call=_name(fn), errno=errno.errorcode.get(exc.errno or 0, "?"))
