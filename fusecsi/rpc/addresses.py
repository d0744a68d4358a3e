"""Addresses: `host:port`, `[v6]:port`, `unix:/path`; opening a socket to one, and the one
error a failed connect becomes.
"""

from __future__ import annotations

import errno
import socket as stdsocket

import trio

from fusecsi.rpc.errors import RPCUnavailable


def parse_addr(addr: str, default_port: int) -> tuple[str, int]:
    """`host:port`, `host`, `[v6]:port` -> (host, port)."""
    addr = addr.strip()
    if addr.startswith("["):
        host, _, rest = addr[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif addr.count(":") == 1:
        host, port = addr.split(":")
    else:
        host, port = addr, ""
    if not host:
        raise ValueError(f"address {addr!r} has no host")
    if not port:
        return host, default_port
    if not port.isascii() or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"address {addr!r}: port must be 0-65535")
    return host, int(port)


async def open_socket(address: str, default_port: int = 0) -> trio.socket.SocketType:
    """Connect to `unix:/path` / `unix:///path` or `host:port`."""
    if address.startswith("unix:"):
        path = address[len("unix://") :] if address.startswith("unix://") else address[5:]
        sock = trio.socket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
        try:
            await sock.connect(path)
        except BaseException:
            sock.close()
            raise
        return sock
    host, port = parse_addr(address, default_port)
    infos = await trio.socket.getaddrinfo(host, port, type=stdsocket.SOCK_STREAM)
    last: OSError | None = None
    for family, type_, proto, _, sockaddr in infos:
        sock = trio.socket.socket(family, type_, proto)
        try:
            await sock.connect(sockaddr)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        except BaseException:
            sock.close()
            raise
        sock.setsockopt(stdsocket.IPPROTO_TCP, stdsocket.TCP_NODELAY, 1)
        return sock
    raise last or OSError(errno.ECONNREFUSED, f"cannot resolve {address}")


def unreachable(address: str, exc: OSError) -> RPCUnavailable:
    """ECONNREFUSED (what callers retry on) for any failed connect, with the reason in words:
    no such host, connection refused, or the system's text."""
    if isinstance(exc, stdsocket.gaierror):
        reason = f"no such host ({exc.strerror})"
    elif exc.errno == errno.ECONNREFUSED:
        reason = "connection refused"
    else:
        name = errno.errorcode.get(exc.errno or 0)
        reason = f"{name}: {exc.strerror}" if name else str(exc)
    return RPCUnavailable(errno.ECONNREFUSED, f"cannot connect to {address}: {reason}")
