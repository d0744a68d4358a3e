"""One call on a blocking socket, for readiness probes and scripts outside trio."""

from __future__ import annotations

import errno
import socket as stdsocket
from typing import Any

import msgpack

from fusecsi.rpc.addresses import parse_addr, unreachable
from fusecsi.rpc.errors import RPCError, RPCUnavailable
from fusecsi.rpc.framing import DEFAULT_MAX_FRAME, HEADER, REQUEST, encode, unpack_frame


def _recv_exact(sock: stdsocket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(n - got)
        if not chunk:
            raise EOFError("connection closed")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def call_sync(
    address: str, method: str, *args: Any, token: str | None = None, timeout: float = 10.0
) -> Any:
    """One call on a fresh blocking connection: readiness probes and scripts outside trio."""
    if address.startswith("unix:"):
        path = address[len("unix://") :] if address.startswith("unix://") else address[5:]
        sock = stdsocket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
        sock.settimeout(timeout)
        target: Any = path
    else:
        host, port = parse_addr(address, 0)
        sock = stdsocket.socket(stdsocket.AF_INET6 if ":" in host else stdsocket.AF_INET)
        sock.settimeout(timeout)
        target = (host, port)
    try:
        try:
            sock.connect(target)
        except OSError as exc:
            raise unreachable(address, exc) from None
        calls = ([["hello", [token]]] if token is not None else []) + [[method, list(args)]]
        sock.sendall(b"".join(encode([REQUEST, i + 1, m, a]) for i, (m, a) in enumerate(calls)))
        result = None
        for _ in calls:
            (length,) = HEADER.unpack(_recv_exact(sock, HEADER.size))
            try:
                if length > DEFAULT_MAX_FRAME:
                    raise ValueError(f"a frame of {length} bytes")
                _, _, err, result = unpack_frame(_recv_exact(sock, length))
            except (ValueError, TypeError, msgpack.UnpackException) as exc:
                raise RPCUnavailable(
                    errno.EPROTO, f"{address} is not a fusecsi server (its answer: {exc})"
                ) from None
            if err is not None:
                raise RPCError(str(err[0]), str(err[1]))
        return result
    except (TimeoutError, EOFError, ConnectionError) as exc:
        raise RPCUnavailable(errno.ETIMEDOUT, f"{method} on {address}: {exc}") from None
    finally:
        sock.close()
