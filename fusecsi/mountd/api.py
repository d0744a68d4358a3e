"""mountd's control API: the handler table served on its unix socket (docs/contracts.md)."""

from __future__ import annotations

import trio

from fusecsi.mountd.supervisor import Supervisor
from fusecsi.rpc.server import Server


def _shielded(operation):
    """A caller that hangs up must not cut a publish or unpublish in half.

    Every step inside has its own deadline, so the shield cannot hold mountd forever.
    """

    async def call(*args):
        with trio.CancelScope(shield=True):
            return await operation(*args)

    call.__name__ = operation.__name__
    return call


def handlers(supervisor: Supervisor) -> dict:
    return {
        "ping": lambda: "ok",
        "publish": _shielded(supervisor.publish),
        "unpublish": _shielded(supervisor.unpublish),
        "stats": supervisor.stats,
        "list": supervisor.list,
    }


def server(supervisor: Supervisor) -> Server:
    return Server(handlers(supervisor), name="mountd")
