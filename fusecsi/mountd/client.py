"""Client of mountd's control API (used by the CSI node plugin and `fusecsi mountd status`).

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
from fusecsi.rpc.connection import connect
from fusecsi.rpc.errors import RPCError, RPCUnavailable

__all__ = ["MountdClient", "RPCError", "RPCUnavailable"]

# A publish may have to start a FUSE daemon and wait for its mount (mountd's own deadline
# is shorter), so it gets more time than the quick calls.
PUBLISH_TIMEOUT = 90.0
CALL_TIMEOUT = 30.0


class MountdClient:
    def __init__(self, endpoint: str, *, timeout: float = CALL_TIMEOUT) -> None:
        self.endpoint = endpoint if endpoint.startswith("unix:") else f"unix://{endpoint}"
        self.timeout = timeout

    async def call(self, method: str, *args: Any, limit: float | None = None) -> Any:
        limit = self.timeout if limit is None else limit
        answer: list[Any] = []
        with unwrapped():
            async with trio.open_nursery() as nursery:
                with trio.move_on_after(limit):
                    answer.append(await self._exchange(nursery, method, args))
                nursery.cancel_scope.cancel()
        if not answer:
            raise RPCUnavailable(
                errno.ETIMEDOUT, f"mountd did not answer {method} within {limit:g}s"
            )
        return answer[0]

    async def _exchange(self, nursery: trio.Nursery, method: str, args) -> Any:
        conn = await connect(nursery, self.endpoint)
        try:
            return await conn.call(method, *args)
        finally:
            conn.close()

    async def ping(self) -> str:
        return await self.call("ping")

    async def publish(
        self,
        volume_id: str,
        master_addrs: str,
        fs_path: str,
        subpath: str,
        options: str,
        target: str,
        readonly: bool,
        token: str | None = None,
        pod_namespace: str | None = None,
        pod_name: str | None = None,
    ) -> dict:
        """{"key", "mountpoint", "daemon_started"}; EEXIST, ENOENT, EPERM, EINVAL, ETIMEDOUT.
        The pod (from podInfoOnMount) is told through Events when its mount breaks."""
        args = [volume_id, master_addrs, fs_path, subpath, options, target, bool(readonly), token]
        limit = max(self.timeout, PUBLISH_TIMEOUT)
        if not (pod_namespace and pod_name):
            return await self.call("publish", *args, limit=limit)
        try:
            return await self.call("publish", *args, pod_namespace, pod_name, limit=limit)
        except RPCError as exc:
            # a mountd older than the pod arguments (it is upgraded on its own schedule)
            if exc.errno != errno.EINVAL or not exc.strerror.startswith("bad arguments"):
                raise
        return await self.call("publish", *args, limit=limit)

    async def unpublish(self, volume_id: str, target: str) -> dict:
        """{"removed": bool}; idempotent."""
        return await self.call("unpublish", volume_id, target)

    async def stats(self, target: str) -> dict:
        """Usage, quota and health of a published target; ENOENT when not published."""
        return await self.call("stats", target)

    async def list(self) -> list[dict]:
        return await self.call("list")
