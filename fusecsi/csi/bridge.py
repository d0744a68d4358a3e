"""The one place that touches asyncio: grpclib's server running inside trio.

grpclib is asyncio-only. trio-asyncio runs an asyncio loop inside trio; grpclib accepts
connections and decodes requests there, and every call is handed straight back to trio
through `dispatch`, so the services behind this module are plain trio code.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any

import trio
import trio_asyncio
from google.protobuf.message import DecodeError
from grpclib.client import Channel
from grpclib.const import Handler, Status
from grpclib.exceptions import GRPCError
from grpclib.server import Server

from fusecsi.csi.generated import csi_grpc

# dispatch(full method name, request) -> reply, run in trio
Dispatch = Callable[[str, Any], Awaitable[Any]]


class _Names:
    """Stands in for a servicer: the generated __mapping__ reads self.<Method>, and only the
    paths and message types it returns are used."""

    def __getattr__(self, name: str) -> str:
        return name


def _mapping(bases: Iterable[type], dispatch: Dispatch) -> dict[str, Handler]:
    """Handlers for every method of the generated service bases, all routed to dispatch."""
    mapping: dict[str, Handler] = {}
    for base in bases:
        for path, handler in base.__mapping__(_Names()).items():
            mapping[path] = Handler(
                _unary(path, dispatch),
                handler.cardinality,
                handler.request_type,
                handler.reply_type,
            )
    return mapping


def _unary(path: str, dispatch: Dispatch):
    call_trio = trio_asyncio.trio_as_aio(dispatch)

    async def handle(stream) -> None:
        try:
            request = await stream.recv_message()
        except DecodeError as exc:
            raise GRPCError(Status.INVALID_ARGUMENT, f"request does not parse: {exc}") from None
        reply = await call_trio(path, request)
        await stream.send_message(reply)

    return handle


async def serve(
    sock: socket.socket,
    bases: Iterable[type],
    dispatch: Dispatch,
    *,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the given generated service bases on a bound, not yet listening socket until
    cancelled. Calls already running when cancelled are cancelled with the server."""
    mapping = _mapping(bases, dispatch)

    class _Service:
        def __mapping__(self) -> dict[str, Handler]:
            return mapping

    async with trio_asyncio.open_loop():
        server = await trio_asyncio.aio_as_trio(_start)(_Service(), sock)
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                server.close()
                await trio_asyncio.aio_as_trio(server.wait_closed)()


async def _start(service: Any, sock: socket.socket) -> Server:
    server = Server([service])
    await server.start(sock=sock)
    return server


Call = Callable[[str, str, Any], Awaitable[Any]]


@asynccontextmanager
async def connect(path: str) -> AsyncIterator[Call]:
    """A CSI client for trio code (the walkthrough, tests): `await call("Node",
    "NodePublishVolume", request)`. GRPCError carries the server's status."""
    async with connect_many([path]) as (call,):
        yield call


@asynccontextmanager
async def connect_many(paths: Iterable[str]) -> AsyncIterator[list[Call]]:
    """One client per socket path, all on one asyncio loop."""
    async with trio_asyncio.open_loop():
        channels = [await trio_asyncio.aio_as_trio(_channel)(path) for path in paths]
        try:
            yield [_caller(channel) for channel in channels]
        finally:
            for channel in channels:
                channel.close()


def _caller(channel: Channel) -> Call:
    stubs: dict[str, Any] = {}

    async def call(service: str, method: str, request: Any) -> Any:
        if service not in stubs:
            stubs[service] = getattr(csi_grpc, f"{service}Stub")(channel)
        return await trio_asyncio.aio_as_trio(getattr(stubs[service], method))(request)

    return call


async def _channel(path: str) -> Channel:
    return Channel(path=path)
