"""`fusecsi node`: CSI Identity + Node on a unix socket, asking mountd to do the mounting."""

from __future__ import annotations

import socket

import trio

from fusecsi import logs, unix_socket
from fusecsi.csi_server import CsiServer, add_server_flags, run_until_signal
from fusecsi.identity import IdentityService


def configure(parser) -> None:
    add_server_flags(parser, "unix:///csi/csi.sock")
    parser.add_argument("--node-id", required=True, help="this node's name (NodeGetInfo)")
    parser.add_argument(
        "--mountd",
        default="unix:///run/fusecsi/mountd.sock",
        help="mountd's control socket",
    )


def _mountd_answers(endpoint: str):
    path = unix_socket.endpoint_path(endpoint)

    def connect() -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(2.0)
            try:
                probe.connect(path)
            except OSError:
                return False
            return True

    async def ready() -> bool:
        return await trio.to_thread.run_sync(connect)

    return ready


def build_server(args) -> CsiServer:
    identity = IdentityService(controller=False, ready=_mountd_answers(args.mountd))
    return CsiServer({"Identity": identity})


def run(args) -> int:
    logs.setup("node", args.log_level)
    trio.run(run_until_signal, build_server(args), args.endpoint, args.grace)
    return 0
