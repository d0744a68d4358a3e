"""Kubernetes Events for what a user must know (a refused delete, a recovered mount).

Posting never blocks or fails the operation that asks for it: `post_*` only queues a job
(dropped, with a log line, when the queue is full), and one background task resolves the
object and posts under the API's deadline. Without a configured API each job is a log line.

Which object an event lands on:
- a volume (DeleteVolume, ControllerExpandVolume carry only the volume id): the PVC named in
  the claimRef of the PV whose CSI volume handle is the id, while that PVC still exists;
  else the PV itself (a refused delete usually runs after the PVC is gone);
- a claim (CreateVolume names the PVC in its extra-create-metadata): that PVC, when a check
  of it (and of what it names, such as its StorageClass) finds something to say;
- a pod: the pod kubelet named in the publish (podInfoOnMount), if it still exists.
"""

from __future__ import annotations

import datetime
import logging
import socket
from collections.abc import Awaitable, Callable

import trio

from fusecsi.k8s import KubeApi, KubeError, KubeNotFound
from fusecsi.logs import fields

log = logging.getLogger("fusecsi.events")

QUEUE = 256
PV_EVENTS_NAMESPACE = "default"  # a PV is cluster-scoped; kubectl looks for its events here


def event_body(involved: dict, reason: str, message: str, kind: str, component: str) -> dict:
    """An Event (core/v1) about `involved` (an object's JSON)."""
    meta = involved.get("metadata") or {}
    namespace = meta.get("namespace") or PV_EVENTS_NAMESPACE
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    host = socket.gethostname()
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{meta.get('name', 'fusecsi')}.", "namespace": namespace},
        "involvedObject": {
            "apiVersion": "v1",
            "kind": involved.get("kind", ""),
            "namespace": meta.get("namespace", ""),
            "name": meta.get("name", ""),
            "uid": meta.get("uid", ""),
        },
        "reason": reason,
        "message": message[:1024],
        "type": kind,
        "source": {"component": component, "host": host},
        "reportingComponent": component,
        "reportingInstance": host,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }


TOLD_LIMIT = 10_000  # remembered Events; beyond, they may be posted once more


class Events:
    def __init__(self, kube: KubeApi | None, component: str) -> None:
        self.kube = kube
        self.component = component
        self._send, self._receive = trio.open_memory_channel(QUEUE)
        # (object uid, reason, message) already posted by post_on_volume: a refused
        # DeleteVolume is retried by the provisioner for ever, and one Event says it all
        self._told: set[tuple[str, str, str]] = set()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Post queued events, one at a time, until cancelled."""
        task_status.started()
        async for job in self._receive:
            try:
                await job()
            except KubeError as exc:
                log.warning("event not posted", extra=fields(error=str(exc)))
            except Exception:
                log.exception("event not posted")

    def _queue(self, what: str, reason: str, message: str, job) -> None:
        if self.kube is None or not self.kube.configured:
            log.info(
                "event not posted: no Kubernetes API configured",
                extra=fields(about=what, reason=reason, message=message),
            )
            return
        try:
            self._send.send_nowait(job)
        except trio.WouldBlock:
            log.warning("event dropped: too many queued", extra=fields(about=what, reason=reason))

    async def _post(self, involved: dict, reason: str, message: str, kind: str) -> None:
        body = event_body(involved, reason, message, kind, self.component)
        await self.kube.run(self.kube.create_event, body["metadata"]["namespace"], body)
        log.info(
            "event posted",
            extra=fields(about=body["involvedObject"]["name"], reason=reason, type=kind),
        )

    def post_on_volume(self, volume_id: str, reason: str, message: str, kind="Warning") -> None:
        async def job() -> None:
            pv = await self.kube.run(self.kube.volume_pv, volume_id)
            if pv is None:
                log.info(
                    "event not posted: no PV has this volume handle",
                    extra=fields(volume_id=volume_id, reason=reason),
                )
                return
            claim = (pv.get("spec") or {}).get("claimRef") or {}
            involved = {**pv, "kind": "PersistentVolume"}
            if claim.get("name") and claim.get("namespace"):
                try:
                    involved = await self.kube.run(
                        self.kube.read_object,
                        "PersistentVolumeClaim",
                        claim["namespace"],
                        claim["name"],
                    )
                    involved.setdefault("kind", "PersistentVolumeClaim")
                except KubeNotFound:
                    pass  # the claim is gone: the PV carries the event
            await self._post_once(involved, reason, message, kind)

        self._queue(volume_id, reason, message, job)

    async def _post_once(self, involved: dict, reason: str, message: str, kind: str) -> None:
        """Post unless this very Event (object, reason, message) was posted already."""
        meta = involved.get("metadata") or {}
        told = (meta.get("uid") or meta.get("name", ""), reason, message)
        if told in self._told:
            return
        if len(self._told) >= TOLD_LIMIT:
            self._told.clear()
        self._told.add(told)
        await self._post(involved, reason, message, kind)

    def post_on_claim(
        self,
        namespace: str,
        name: str,
        reason: str,
        check: Callable[[dict], Awaitable[str | None]],
        *,
        about: str,
        kind="Warning",
    ) -> None:
        """Once per claim and message: read the PVC, and post `await check(pvc)` on it
        unless that is None. `about` says what is checked (the log line when nothing can be
        posted)."""

        async def job() -> None:
            try:
                pvc = await self.kube.run(
                    self.kube.read_object, "PersistentVolumeClaim", namespace, name
                )
            except KubeNotFound:
                log.info("event not posted: PVC is gone", extra=fields(pvc=f"{namespace}/{name}"))
                return
            pvc.setdefault("kind", "PersistentVolumeClaim")
            message = await check(pvc)
            if message is not None:
                await self._post_once(pvc, reason, message, kind)

        self._queue(f"{namespace}/{name}", reason, about, job)

    def post_on_pod(
        self, namespace: str, name: str, reason: str, message: str, kind="Warning"
    ) -> None:
        async def job() -> None:
            try:
                pod = await self.kube.run(self.kube.read_object, "Pod", namespace, name)
            except KubeNotFound:
                log.info("event not posted: pod is gone", extra=fields(pod=f"{namespace}/{name}"))
                return
            pod.setdefault("kind", "Pod")
            await self._post(pod, reason, message, kind)

        self._queue(f"{namespace}/{name}", reason, message, job)
