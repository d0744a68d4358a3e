"""Is the JuiceFS metadata engine answering? A cheap check, no URL or password in argv.

Redis (the common case) gets a PING over its own protocol, after AUTH when the URL has a
password; a SQLite file must exist; any other engine gets `juicefs status` (a process, and
its address in argv, but never the password). The caller bounds the call with a deadline.
"""

from __future__ import annotations

import errno
import os
from urllib.parse import unquote

import trio

from fusecsi.engines.base import Unreachable
from fusecsi.engines.juicefs import commands
from fusecsi.engines.juicefs.metaurl import MetaURL


def _resp(*words: str) -> bytes:
    out = [f"*{len(words)}\r\n".encode()]
    for word in words:
        data = word.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _redis_address(meta: MetaURL) -> tuple[str, int] | None:
    """host and port of a plain single-server redis:// URL (None: another shape)."""
    if meta.scheme != "redis":
        return None
    rest = meta.public.split("://", 1)[1]
    authority = rest.split("/", 1)[0].rsplit("@", 1)[-1]
    if "," in authority or not authority:  # sentinel / cluster lists: juicefs knows them
        return None
    if authority.startswith("["):
        host, _, port = authority[1:].partition("]")
        port = port.lstrip(":")
    else:
        host, _, port = authority.partition(":")
    return unquote(host), int(port or 6379)


async def _read_line(stream: trio.SocketStream, buffer: bytearray) -> bytes:
    while b"\r\n" not in buffer:
        data = await stream.receive_some(4096)
        if not data:
            raise ConnectionResetError(errno.ECONNRESET, "connection closed")
        buffer += data
    line, _, rest = bytes(buffer).partition(b"\r\n")
    buffer[:] = rest
    return line


async def _ping_redis(meta: MetaURL, host: str, port: int) -> OSError | None:
    try:
        stream = await trio.open_tcp_stream(host, port)
    except OSError as exc:
        return Unreachable(
            f"JuiceFS metadata {meta.public} does not answer: {exc.strerror or exc}",
            errno.ECONNREFUSED,
        )
    async with stream:
        request = b""
        if meta.password:
            words = ("AUTH", meta.user, meta.password) if meta.user else ("AUTH", meta.password)
            request += _resp(*words)
        request += _resp("PING")
        try:
            await stream.send_all(request)
            buffer = bytearray()
            replies = [await _read_line(stream, buffer) for _ in range(2 if meta.password else 1)]
        except OSError as exc:
            return Unreachable(f"JuiceFS metadata {meta.public} does not answer: {exc}")
    for reply in replies:
        if reply.startswith(b"-"):
            text = reply[1:].decode(errors="replace").split("\n")[0]
            return OSError(errno.EACCES, f"JuiceFS metadata {meta.public} refused: {text}")
    return None


def _is_file(path: str) -> bool:
    return os.path.isfile(path)  # a stat of a local file: does not block for long


async def probe(meta: MetaURL, *, seconds: float = 30.0) -> OSError | None:
    address = _redis_address(meta)
    if address is not None:
        return await _ping_redis(meta, *address)
    if meta.scheme == "sqlite3":
        path = meta.public.split("://", 1)[1].split("?", 1)[0]
        if not _is_file(path):
            return OSError(errno.ENOENT, f"JuiceFS metadata file {path} does not exist")
        return None
    try:
        await commands.run(meta, ["status", meta.public], seconds=seconds)
    except OSError as exc:
        return exc
    return None
