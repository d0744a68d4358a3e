"""mountd's control API: named fields per method, a version, served on its unix socket.

Every call carries one map of named fields (docs/contracts.md). A field the method does not
know, a missing required one, or anything but a map is refused with one EINVAL line that
names it, so a node plugin newer than its mountd learns at once what is wrong. A client asks
`version` first on each connection: a mountd from before versions answers ENOSYS to it.
"""

from __future__ import annotations

import errno

import trio

from fusecsi.mountd.api_version import VERSION
from fusecsi.mountd.supervisor import Supervisor
from fusecsi.rpc.errors import RPCError
from fusecsi.rpc.server import Server


def err(code: int, message: str) -> RPCError:
    return RPCError(code, message)


# method -> (required fields, optional fields)
SCHEMA: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "version": (frozenset({"version"}), frozenset()),
    "ping": (frozenset(), frozenset()),
    "publish": (
        frozenset({"volume_id", "cluster", "fs_path", "subpath", "target", "readonly"}),
        frozenset({"engine", "options", "secrets", "pod_namespace", "pod_name", "single_writer"}),
    ),
    "unpublish": (frozenset({"volume_id", "target"}), frozenset()),
    "stats": (frozenset({"target"}), frozenset()),
    "list": (frozenset(), frozenset()),
    "roll": (frozenset(), frozenset({"key", "grace"})),
}


def check_fields(method: str, args: tuple) -> dict:
    """The call's fields, checked against SCHEMA (EINVAL naming what is wrong)."""
    if len(args) != 1 or not isinstance(args[0], dict):
        raise err(
            errno.EINVAL,
            f"{method} takes one map of named fields (mountd API version {VERSION}); "
            "is the node plugin older than mountd?",
        )
    fields = args[0]
    required, optional = SCHEMA[method]
    unknown = sorted(str(k) for k in fields if k not in required | optional)
    if unknown:
        raise err(
            errno.EINVAL,
            f"{method}: unknown field(s) {', '.join(unknown)} (mountd API version {VERSION})",
        )
    missing = sorted(required - fields.keys())
    if missing:
        raise err(errno.EINVAL, f"{method}: missing field(s) {', '.join(missing)}")
    return fields


def version(*, version) -> dict:
    if version != VERSION:
        raise err(
            errno.EPROTONOSUPPORT,
            f"mountd speaks API version {VERSION}, the caller {version!r}: "
            "upgrade the older of node plugin and mountd",
        )
    return {"version": VERSION}


def _handler(method: str, operation, *, shielded: bool = False):
    """`operation(**fields)` behind the schema check. A shielded one is not cut in half by
    a caller that hangs up (every step inside has its own deadline, so the shield cannot
    hold mountd forever)."""

    async def call(*args):
        fields = check_fields(method, args)
        if not shielded:
            answer = operation(**fields)
            return await answer if hasattr(answer, "__await__") else answer
        with trio.CancelScope(shield=True):
            return await operation(**fields)

    call.__name__ = method
    return call


def handlers(supervisor: Supervisor) -> dict:
    return {
        "version": _handler("version", version),
        "ping": _handler("ping", lambda: "ok"),
        "publish": _handler("publish", supervisor.publish, shielded=True),
        "unpublish": _handler("unpublish", supervisor.unpublish, shielded=True),
        "stats": _handler("stats", supervisor.stats),
        "list": _handler("list", supervisor.list),
        # not shielded as a whole: a caller that hangs up stops the keys not yet begun; a
        # handover under way always completes (rolling.py shields each)
        "roll": _handler("roll", supervisor.roll),
    }


def server(supervisor: Supervisor) -> Server:
    return Server(handlers(supervisor), name="mountd")
