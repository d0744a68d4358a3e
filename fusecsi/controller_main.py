"""`fusecsi controller`: CSI Identity + Controller on a unix socket."""

from __future__ import annotations

import trio

from fusecsi import logs
from fusecsi.csi_server import CsiServer, add_server_flags, run_until_signal
from fusecsi.identity import IdentityService


def configure(parser) -> None:
    add_server_flags(parser, "unix:///csi/csi.sock")


def build_server(args) -> CsiServer:
    return CsiServer({"Identity": IdentityService(controller=True)})


def run(args) -> int:
    logs.setup("controller", args.log_level)
    trio.run(run_until_signal, build_server(args), args.endpoint, args.grace)
    return 0
