"""`fusecsi worker`: stores blocks and serves them straight to clients."""

from __future__ import annotations

import logging
import os
import signal
import socket
from pathlib import Path

import trio

from fusecsi import unix_socket
from fusecsi.cluster import roles
from fusecsi.cluster.worker.service import WorkerService
from fusecsi.cluster.worker.shortcircuit import LOCAL_OPENS, LocalServer
from fusecsi.cluster.worker.store import BlockStore
from fusecsi.logs import fields
from fusecsi.metrics import gauge
from fusecsi.rpc.addresses import parse_addr
from fusecsi.rpc.framing import DEFAULT_MAX_FRAME
from fusecsi.rpc.pool import Pool
from fusecsi.rpc.server import Server

log = logging.getLogger("fusecsi.worker")

DEFAULT_PORT = 8997
MASTER_PORT = 8995


def configure(parser) -> None:
    roles.add_common_flags(parser, f"0.0.0.0:{DEFAULT_PORT}")
    parser.add_argument("--master-addrs", required=True, metavar="A[,B]", help=roles.MASTERS_HELP)
    parser.add_argument(
        "--advertise", metavar="HOST:PORT", help="address clients use (default: the listen address)"
    )
    parser.add_argument(
        "--capacity", type=int, metavar="BYTES", help="report at most this much space"
    )
    parser.add_argument(
        "--local-socket",
        metavar="PATH",
        help="unix socket handing block files to clients on this host (short-circuit I/O; "
        "default <data-dir>/worker.sock; '' turns it off)",
    )


def bind_local(args) -> tuple[socket.socket | None, str | None]:
    """The short-circuit socket (mode 0600) and its path; none when turned off, or when the
    default path does not fit a unix socket address (logged)."""
    path = args.local_socket
    if path == "":
        return None, None
    explicit = path is not None
    if not explicit:
        path = os.path.join(os.path.abspath(args.data_dir), "worker.sock")
    try:
        return unix_socket.bind(path), path
    except ValueError as exc:
        if explicit:
            raise
        log.warning("no short-circuit socket", extra=fields(err=str(exc)))
        return None, None


def advertised(listen: str, advertise: str | None, port: int) -> str:
    if advertise:
        host, p = parse_addr(advertise, port)
    else:
        host, p = parse_addr(listen, DEFAULT_PORT)
        if host in ("0.0.0.0", "::", ""):
            host = socket.gethostname()
        p = port
    return f"[{host}]:{p}" if ":" in host else f"{host}:{p}"


async def serve(args, token: str | None) -> None:
    masters = [a.strip() for a in args.master_addrs.split(",") if a.strip()]
    if not masters:
        raise ValueError("--master-addrs is empty")
    store = BlockStore(Path(args.data_dir), args.capacity)
    local, local_path = bind_local(args)
    sock = await roles.bind(args.listen, DEFAULT_PORT)
    port = sock.getsockname()[1]
    advertise = advertised(args.listen, args.advertise, port)
    max_frame = DEFAULT_MAX_FRAME * 2
    async with trio.open_nursery() as nursery:
        pool = Pool(nursery, token=token, default_port=MASTER_PORT, timeout=10)
        service = WorkerService(store, pool, masters, advertise, local_path)
        server = Server(service.handlers(), token=token, max_frame=max_frame, name="worker")
        if local is not None:
            local_server = LocalServer(
                store.worker_id, token, lambda: service.block_size, service.open_local
            )
            await nursery.start(local_server.serve, local)
        roles.serve_metrics(
            args.metrics_address,
            server,
            gauge("fusecsi_worker_used_bytes", "bytes held in blocks", lambda: store.used),
            gauge("fusecsi_worker_free_bytes", "free bytes reported", lambda: store.space()[1]),
            gauge("fusecsi_worker_blocks", "blocks stored", store.count_blocks),
            LOCAL_OPENS,
        )
        await nursery.start(server.serve, sock)
        log.info(
            "worker listening",
            extra=fields(
                address=advertise,
                worker=store.worker_id,
                blocks_bytes=store.used,
                local_socket=local_path,
            ),
        )
        await nursery.start(service.heartbeats)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("stopping", extra=fields(signal=signum))
                break
        await service.leave()
        if local_path is not None:
            unix_socket.remove(local_path)
        nursery.cancel_scope.cancel()


def run(args) -> int:
    return roles.run_role("worker", args, serve)
