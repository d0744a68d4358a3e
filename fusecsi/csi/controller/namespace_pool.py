"""The controller's open Namespaces: one per (engine, cluster address, secrets), opened on
first use through the engine seam and kept open (a connection, or an engine's private mount)
until the pool's task is cancelled."""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from fusecsi import engines
from fusecsi.engines.base import Cluster, Namespace, Unreachable
from fusecsi.locks import KeyedLocks
from fusecsi.logs import fields

log = logging.getLogger("fusecsi.namespace_pool")

_Key = tuple[str, str, frozenset]


def _key(cluster: Cluster) -> _Key:
    # secrets are part of the key (Cluster's equality leaves them out on purpose): a
    # request with another token must not ride on a connection opened with the first one
    return cluster.engine, cluster.address, frozenset(cluster.secrets.items())


class NamespacePool:
    """Owned by the task running `run`; every Namespace is closed when it is cancelled."""

    def __init__(
        self,
        *,
        timeout: float,
        open_namespace: Callable[..., Namespace] = engines.open_namespace,
    ) -> None:
        self.timeout = timeout  # what each Namespace's own calls may take
        self._open_namespace = open_namespace  # the registry's; tests give a fake engine's
        self._open: dict[_Key, Namespace] = {}
        self._opening = KeyedLocks()
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            self._open.clear()

    async def get(self, cluster: Cluster) -> Namespace:
        key = _key(cluster)
        namespace = self._open.get(key)
        if namespace is not None:
            return namespace
        async with self._opening.hold(key):
            if key not in self._open:
                if self._nursery is None:
                    raise Unreachable("the controller is shutting down")
                self._open[key] = await self._nursery.start(self._hold, cluster)
        return self._open[key]

    async def _hold(self, cluster: Cluster, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        # a Namespace may own a nursery: enter and leave it in this one task
        key = _key(cluster)
        opened = False
        try:
            async with self._open_namespace(cluster, timeout=self.timeout) as namespace:
                task_status.started(namespace)
                opened = True
                await trio.sleep_forever()
        except Exception as exc:
            if not opened:
                raise  # failed to open: the caller of get() hears it
            # failed while closing: the pool goes on without it
            log.warning(
                "closing a namespace failed",
                extra=fields(engine=cluster.engine, address=cluster.address, error=str(exc)),
            )
        finally:
            self._open.pop(key, None)
