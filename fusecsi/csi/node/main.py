"""`fusecsi node`: CSI Identity + Node on a unix socket, asking mountd to do the mounting."""

from __future__ import annotations

import trio

from fusecsi import logs, metrics
from fusecsi.csi.identity import IdentityService
from fusecsi.csi.node.service import NodeService
from fusecsi.csi.server import CsiServer, add_server_flags, run_until_signal
from fusecsi.mountd.client import MountdClient


def configure(parser) -> None:
    add_server_flags(parser, "unix:///csi/csi.sock")
    parser.add_argument("--node-id", required=True, help="this node's name (NodeGetInfo)")
    parser.add_argument(
        "--mountd",
        default="unix:///run/fusecsi/mountd.sock",
        help="mountd's control socket",
    )


def build_server(args) -> CsiServer:
    node = NodeService(args.node_id, MountdClient(args.mountd))
    identity = IdentityService(controller=False, ready=node.mountd_ready)
    return CsiServer({"Identity": identity, "Node": node})


def run(args) -> int:
    logs.setup("node", args.log_level)
    server = build_server(args)
    metrics.serve_csi(server, args.metrics_address)
    trio.run(run_until_signal, server, args.endpoint, args.grace)
    return 0
