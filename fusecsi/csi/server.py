"""Serving CSI services on a unix socket: per-call logging, draining on SIGTERM/SIGINT.

A service implementation is a plain object whose async methods are named after the RPCs
(`async def NodePublishVolume(self, request) -> reply`) and raise
`grpclib.exceptions.GRPCError` with the status the CSI spec names. Methods it does not
define answer UNIMPLEMENTED.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable, Mapping
from typing import Any

import trio
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from fusecsi import metrics, unix_socket
from fusecsi.csi import bridge as grpc_bridge
from fusecsi.csi.generated import csi_grpc
from fusecsi.logs import fields

log = logging.getLogger("fusecsi.csi")

# observer(method, status, seconds): metrics hook for every finished call (fusecsi.metrics)
Observer = Callable[[str, Status, float], None]


def _volume_id(request: Any) -> str:
    for name in ("volume_id", "name", "source_volume_id"):
        value = getattr(request, name, "")
        if isinstance(value, str) and value:
            return value
    return ""


def _generated_bases() -> dict[str, type]:
    """Every service in the CSI proto, by name: unserved ones still answer UNIMPLEMENTED."""
    return {
        name.removesuffix("Base"): base
        for name, base in vars(csi_grpc).items()
        if name.endswith("Base") and isinstance(base, type)
    }


class CsiServer:
    def __init__(self, services: Mapping[str, object]) -> None:
        """services: implementations by CSI service name ("Identity", "Node", ...)."""
        self.services = dict(services)
        self._bases = _generated_bases()
        unknown = set(self.services) - set(self._bases)
        if unknown:
            raise ValueError(f"not CSI services: {sorted(unknown)}")
        self.observers: list[Observer] = []
        self._in_flight = 0
        self._idle = trio.Event()
        self._idle.set()
        self._draining = False

    async def dispatch(self, path: str, request: Any) -> Any:
        service, method = path.rsplit("/", 1)
        # paths look like /csi.v1.Node/NodePublishVolume
        impl = getattr(self.services.get(service.rsplit(".", 1)[-1]), method, None)
        started = time.monotonic()
        status, message = Status.OK, ""
        if self._draining:
            status, message = Status.UNAVAILABLE, "server is shutting down"
        self._in_flight += 1
        self._idle = trio.Event() if self._in_flight == 1 else self._idle
        try:
            if status is not Status.OK:
                raise GRPCError(status, message)
            if impl is None:
                status, message = Status.UNIMPLEMENTED, f"{method} is not implemented"
                raise GRPCError(status, message)
            return await impl(request)
        except GRPCError as exc:
            status, message = exc.status, exc.message or ""
            raise
        except trio.Cancelled:
            status, message = Status.CANCELLED, "cancelled"
            raise
        except Exception as exc:
            status, message = Status.INTERNAL, f"{method} failed: {type(exc).__name__}: {exc}"
            log.exception("unexpected error", extra=fields(method=method))
            raise GRPCError(status, message) from exc
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()
            elapsed = time.monotonic() - started
            log.info(
                "call",
                extra=fields(
                    method=method,
                    volume_id=_volume_id(request),
                    code=status.name,
                    message=message,
                    duration_ms=round(elapsed * 1000, 3),
                ),
            )
            for observe in self.observers:
                observe(method, status, elapsed)

    async def drain(self, grace: float) -> None:
        """Refuse new calls and give running ones up to `grace` seconds to finish."""
        self._draining = True
        with trio.move_on_after(grace):
            await self._idle.wait()

    async def serve(self, endpoint: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Listen on `endpoint` until cancelled; the socket file is removed on the way out."""
        path = unix_socket.endpoint_path(endpoint)
        sock = unix_socket.bind(path)
        try:
            bases = self._bases.values()
            await grpc_bridge.serve(sock, bases, self.dispatch, task_status=task_status)
        finally:
            sock.close()
            unix_socket.remove(path)


async def run_until_signal(server: CsiServer, endpoint: str, grace: float = 10.0) -> None:
    """Serve until SIGTERM or SIGINT, then drain within `grace` and stop."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, endpoint)
            log.info("listening", extra=fields(endpoint=endpoint))
            async for signum in signals:
                log.info("stopping", extra=fields(signal=signal.Signals(signum).name))
                await server.drain(grace)
                nursery.cancel_scope.cancel()
                break


def add_server_flags(parser, default_endpoint: str) -> None:
    parser.add_argument(
        "--endpoint", default=default_endpoint, help="CSI socket, unix:///path/csi.sock"
    )
    metrics.add_flag(parser)
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    parser.add_argument(
        "--grace", type=float, default=10.0, help="seconds running calls get to finish on SIGTERM"
    )
