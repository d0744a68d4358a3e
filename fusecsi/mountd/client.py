"""Client of mountd's control API (the CSI node plugin, `fusecsi mountd status` and `roll`).

One short-lived connection per call: the socket is local and cheap, and a mountd that
restarted between two calls is simply reached again. Errors are `RPCError` (an OSError
whose errno is mountd's answer); a mountd that cannot be reached or does not answer in
time raises `RPCUnavailable` (ECONNREFUSED / ETIMEDOUT).
"""

from __future__ import annotations

import errno
from typing import Any

import trio

from fusecsi.errors import unwrapped
from fusecsi.mountd.api_version import VERSION
from fusecsi.rpc.connection import connect
from fusecsi.rpc.errors import RPCError, RPCUnavailable

__all__ = ["MountdClient", "RPCError", "RPCUnavailable"]

# A publish may have to start a FUSE daemon and wait for its mount (mountd's own deadline
# is shorter), so it gets more time than the quick calls.
PUBLISH_TIMEOUT = 90.0
# a roll goes key by key, each up to the daemon's grace to leave plus a start
ROLL_TIMEOUT = 3600.0
CALL_TIMEOUT = 30.0


class MountdClient:
    def __init__(self, endpoint: str, *, timeout: float = CALL_TIMEOUT) -> None:
        self.endpoint = endpoint if endpoint.startswith("unix:") else f"unix://{endpoint}"
        self.timeout = timeout

    async def call(self, method: str, limit: float | None = None, **fields: Any) -> Any:
        """One call with named fields, after the version exchange, on a new connection."""
        limit = self.timeout if limit is None else limit
        answer: list[Any] = []
        with unwrapped():
            async with trio.open_nursery() as nursery:
                with trio.move_on_after(limit):
                    answer.append(await self._exchange(nursery, method, fields))
                nursery.cancel_scope.cancel()
        if not answer:
            raise RPCUnavailable(
                errno.ETIMEDOUT, f"mountd did not answer {method} within {limit:g}s"
            )
        return answer[0]

    async def _exchange(self, nursery: trio.Nursery, method: str, fields) -> Any:
        conn = await connect(nursery, self.endpoint)
        try:
            await self._agree_version(conn)
            return await conn.call(method, fields)
        finally:
            conn.close()

    async def _agree_version(self, conn) -> None:
        try:
            answer = await conn.call("version", {"version": VERSION})
        except RPCError as exc:
            if exc.errno != errno.ENOSYS:
                raise
            raise RPCError(
                errno.EPROTONOSUPPORT,
                f"mountd at {self.endpoint} predates API version {VERSION}: upgrade mountd",
            ) from None
        if not isinstance(answer, dict) or answer.get("version") != VERSION:
            raise RPCError(errno.EPROTONOSUPPORT, f"mountd answered version {answer!r}")

    async def ping(self, limit: float | None = None) -> str:
        return await self.call("ping", limit=limit)

    async def publish(
        self,
        *,
        volume_id: str,
        cluster: str,
        fs_path: str,
        subpath: str,
        target: str,
        readonly: bool,
        engine: str = "embedded",
        options: str = "",
        secrets: dict[str, str] | None = None,
        pod_namespace: str | None = None,
        pod_name: str | None = None,
        single_writer: bool = False,
    ) -> dict:
        """{"key", "mountpoint", "daemon_started"}; EEXIST, EBUSY (single-writer), ENOENT,
        EPERM, EINVAL, ETIMEDOUT. The pod (from podInfoOnMount) is told through Events when
        its mount breaks."""
        return await self.call(
            "publish",
            limit=max(self.timeout, PUBLISH_TIMEOUT),
            volume_id=volume_id,
            engine=engine,
            cluster=cluster,
            fs_path=fs_path,
            subpath=subpath,
            options=options,
            target=target,
            readonly=bool(readonly),
            secrets=dict(secrets or {}),
            pod_namespace=pod_namespace,
            pod_name=pod_name,
            single_writer=single_writer,
        )

    async def unpublish(self, volume_id: str, target: str) -> dict:
        """{"removed": bool}; idempotent."""
        return await self.call("unpublish", volume_id=volume_id, target=target)

    async def stats(self, target: str) -> dict:
        """Usage, quota and health of a published target; ENOENT when not published."""
        return await self.call("stats", target=target)

    async def list(self) -> list[dict]:
        return await self.call("list")

    async def roll(self, key: str | None = None, grace: float | None = None) -> list[dict]:
        """Hand each key's daemon (or `key`'s) over to a daemon of mountd's build: per key
        {"key", "result": rolled | skipped | failed, "message", ...}; ENOENT unknown key."""
        fields: dict[str, Any] = {}
        if key is not None:
            fields["key"] = key
        if grace is not None:
            fields["grace"] = grace
        return await self.call("roll", limit=max(self.timeout, ROLL_TIMEOUT), **fields)
