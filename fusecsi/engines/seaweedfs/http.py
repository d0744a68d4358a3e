"""A small HTTP/1.1 client on trio sockets, enough for the SeaweedFS filer and master APIs.

One connection per request (`Connection: close`): the controller makes a handful of calls
per CSI request, so keep-alive would buy little and cost a connection pool. A request goes
to the first endpoint that accepts a connection; once bytes are sent it is never replayed
on another (a mkdir or move must not run twice).
"""

from __future__ import annotations

import base64
import errno
import hashlib
import hmac
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import trio

from fusecsi.engines.base import Unreachable

MAX_BODY = 64 * 1024 * 1024  # a listing page or a status document; anything bigger is wrong
MAX_HEAD = 64 * 1024


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]  # lower-cased names
    body: bytes

    def json(self):
        return json.loads(self.body or b"null")

    def error_text(self) -> str:
        """The server's one-line reason (its JSON `error`, else the body), at most 200 chars."""
        text = self.body.decode("utf-8", "replace")
        try:
            text = str(json.loads(text).get("error", text))
        except (ValueError, AttributeError):
            pass
        return " ".join(text.split())[:200] or f"HTTP {self.status}"


def jwt_hs256(key: str, lifetime: float = 60.0) -> str:
    """A JWT signed with the filer's signing key (HS256, only an expiry claim), which is
    what the filer checks on writes (`jwt.filer_signing`) and, if set, on reads."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = b64(b'{"alg":"HS256","typ":"JWT"}')
    claims = b64(json.dumps({"exp": int(time.time() + lifetime)}).encode())
    signing_input = f"{header}.{claims}".encode()
    signature = hmac.new(key.encode(), signing_input, hashlib.sha256).digest()
    return f"{header}.{claims}.{b64(signature)}"


class _Truncated(OSError):
    """The answer stopped short: the server went away mid-answer."""


def _decode_chunked(data: bytes) -> bytes:
    out = bytearray()
    pos = 0
    while True:
        end = data.index(b"\r\n", pos)
        size = int(data[pos:end].split(b";", 1)[0], 16)
        pos = end + 2
        if size == 0:
            return bytes(out)
        out += data[pos : pos + size]
        pos += size + 2


def _parse(raw: bytes) -> Response:
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise _Truncated(errno.EPROTO, "no complete HTTP answer")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        raise OSError(errno.EPROTO, f"not an HTTP response: {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        try:
            body = _decode_chunked(body)
        except (ValueError, IndexError):
            raise _Truncated(errno.EPROTO, "incomplete chunked HTTP body") from None
    elif "content-length" in headers:
        length = int(headers["content-length"])
        if len(body) < length:
            raise _Truncated(errno.EPROTO, "incomplete HTTP body")
        body = body[:length]
    return Response(int(parts[1]), headers, body)


async def _exchange(stream: trio.abc.Stream, request: bytes) -> Response:
    await stream.send_all(request)
    chunks = bytearray()
    while True:
        data = await stream.receive_some(65536)
        if not data:
            break
        chunks += data
        if len(chunks) > MAX_BODY + MAX_HEAD:
            raise OSError(errno.EFBIG, "HTTP response too large")
    return _parse(bytes(chunks))


async def request(
    endpoints: Sequence[tuple[str, int]],
    method: str,
    target: str,
    *,
    headers: Mapping[str, str] | None = None,
    body: bytes = b"",
    within: float,
    what: str = "filer",
) -> Response:
    """Send one request to the first endpoint that connects; Unreachable when none does
    or the answer does not come within `within` seconds (the whole exchange)."""
    reasons: list[str] = []
    with trio.move_on_after(within) as scope:
        for host, port in endpoints:
            try:
                stream = await trio.open_tcp_stream(host, port)
            except OSError as exc:
                reasons.append(f"{host}:{port} {_reason(exc)}")
                continue
            async with stream:
                lines = [
                    f"{method} {target} HTTP/1.1",
                    f"Host: {f'[{host}]' if ':' in host else host}:{port}",
                    "Connection: close",
                    "Accept: application/json",
                    f"Content-Length: {len(body)}",
                    *(f"{name}: {value}" for name, value in (headers or {}).items()),
                ]
                raw = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
                try:
                    return await _exchange(stream, raw)
                except (trio.BrokenResourceError, _Truncated) as exc:
                    # a server that vanished mid-answer: the caller may try again later
                    raise Unreachable(
                        f"seaweedfs: {what} {host}:{port} dropped the connection ({exc})",
                        errno.ECONNRESET,
                    ) from None
    names = ", ".join(f"{h}:{p}" for h, p in endpoints)
    if scope.cancelled_caught:
        raise Unreachable(f"seaweedfs: no {what} answered within {within:g}s ({names})")
    raise Unreachable(f"seaweedfs: no {what} answered ({'; '.join(reasons)})", errno.ECONNREFUSED)


def _reason(exc: BaseException) -> str:
    """The root of a connect failure (trio wraps each attempt's error in a group)."""
    cause = exc.__cause__
    while isinstance(cause, BaseExceptionGroup):
        cause = cause.exceptions[0]
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror.rsplit(": ", 1)[-1].lower()
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc)
