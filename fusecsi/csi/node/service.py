"""CSI Node service: check kubelet's requests, then let mountd do the mounting.

This process holds no state but the try-locks of calls in flight: mountd owns every FUSE
daemon, bind mount and reference, so the node plugin can be restarted, upgraded or killed
at any moment without any mount noticing.

There is no NodeStageVolume: one FUSE daemon per (cluster, fs-path, options) is shared by
every volume on the node and mountd starts it on the first publish, so there is no
per-volume device to stage; each pod's target is a bind mount of its own.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from grpclib.const import Status

from fusecsi import engines as engine_registry
from fusecsi import kubelet_inputs as inputs
from fusecsi import mount_options
from fusecsi.csi import volumes
from fusecsi.csi.capabilities import capability_problem
from fusecsi.csi.generated import csi_pb2 as pb
from fusecsi.csi.validation import fail, invalid, require
from fusecsi.engines.base import BadParameter, Cluster, NodeEngine
from fusecsi.engines.options import canonical_options
from fusecsi.logs import fields
from fusecsi.mountd.client import MountdClient
from fusecsi.rpc.errors import RPCUnavailable

log = logging.getLogger("fusecsi.node")

_Mode = pb.VolumeCapability.AccessMode
_Rpc = pb.NodeServiceCapability.RPC

READ_ONLY_MODES = frozenset({_Mode.SINGLE_NODE_READER_ONLY, _Mode.MULTI_NODE_READER_ONLY})
CAPABILITIES = (_Rpc.GET_VOLUME_STATS, _Rpc.VOLUME_CONDITION, _Rpc.SINGLE_NODE_MULTI_WRITER)

# mountd's errno names -> CSI codes (docs/contracts.md); anything else is INTERNAL
ERRNO_STATUS = {
    errno.EINVAL: Status.INVALID_ARGUMENT,
    errno.EPERM: Status.INVALID_ARGUMENT,
    errno.EEXIST: Status.ALREADY_EXISTS,
    errno.EBUSY: Status.FAILED_PRECONDITION,  # single-writer volume published elsewhere
    errno.ENOENT: Status.NOT_FOUND,
    errno.ETIMEDOUT: Status.UNAVAILABLE,
    errno.ECONNREFUSED: Status.UNAVAILABLE,
    errno.EPROTO: Status.UNAVAILABLE,
    errno.EPROTONOSUPPORT: Status.UNAVAILABLE,  # node plugin and mountd of other versions
}
PROBE_TIMEOUT = 2.0
# the volume context's engine entry (set by CreateVolume; absent: the default engine)
CTX_ENGINE = "engine"
PATH_KEYS = (volumes.CTX_FS_PATH, volumes.CTX_SUBPATH)
# kubelet adds these with podInfoOnMount; mountd tells that pod (Events) if its mount breaks
POD_NAMESPACE = "csi.storage.k8s.io/pod.namespace"
POD_NAME = "csi.storage.k8s.io/pod.name"


@dataclass(frozen=True)
class Source:
    """What to bind: a directory of one cluster path, served with these FUSE options."""

    cluster: Cluster
    fs_path: str
    subpath: str
    options: str


def _from_volume_id(volume_id: str) -> dict[str, str]:
    """What an id of ours names (the engine too, in ids that record it); {} otherwise."""
    try:
        ref = volumes.VolumeRef.from_volume_id(volume_id)
    except ValueError:
        return {}
    decoded = ref.context(mount_options.DEFAULTS)
    # an id names no options: the defaults it would spell are the embedded engine's
    decoded.pop(volumes.CTX_OPTIONS, None)
    engine = getattr(ref, "engine", "")
    return {**decoded, CTX_ENGINE: engine} if engine else decoded


def resolve_source(
    volume_id: str,
    context: dict[str, str],
    flags: list[str],
    secrets: Mapping[str, str] | None = None,
    engines: Callable[[str], NodeEngine] = engine_registry.node_engine,
) -> Source:
    """Source from the volume context (dynamic and static PVs), gaps filled from the id;
    the cluster as the volume's engine parses it from them and the publish's secrets.

    `flags` are the capability's mount flags (a PV's mountOptions): FUSE options `k=v` from
    the engine's allow-list override the context's; `ro`/`rw` are read by the caller.
    """
    found = {k: v for k, v in context.items() if v}
    if not all(found.get(k) for k in PATH_KEYS) or CTX_ENGINE not in found:
        found = {**_from_volume_id(volume_id), **found}
    name = found.get(CTX_ENGINE) or engine_registry.DEFAULT
    try:
        engine = engines(name)
    except (BadParameter, ImportError):
        invalid(f"volume {volume_id!r}: engine {name!r} is not available on this node")
    needed = (*getattr(engine, "parameters", ()), *PATH_KEYS)
    missing = [key for key in needed if not found.get(key)]
    if missing:
        invalid(
            f"volume_context lacks {', '.join(missing)} and the volume id does not name them "
            f"(a static PV must set {', '.join(needed)} in volumeAttributes)"
        )
    try:
        options = ",".join([found.get(volumes.CTX_OPTIONS, ""), *(f for f in flags if "=" in f)])
        return Source(
            cluster=engine.parse_cluster(found, dict(secrets or {})),
            fs_path=volumes.normalize_fs_path(found[volumes.CTX_FS_PATH]),
            subpath=volumes.validate_subpath(found[volumes.CTX_SUBPATH]),
            options=canonical_options(engine, options),
        )
    except ValueError as exc:  # BadParameter included
        invalid(f"volume {volume_id!r}: {exc}")


def check_capability(capability: pb.VolumeCapability) -> bool:
    """Validate a publish capability; True when it asks for read-only access."""
    mode = capability.access_mode.mode
    if mode == _Mode.UNKNOWN:
        invalid("volume_capability.access_mode missing in request")
    if mode not in _Mode.Mode.values():
        invalid(f"access mode {mode} is not a CSI access mode")
    # the very checks CreateVolume made: a node serves what the controller offers
    problem = capability_problem(capability)
    if problem:
        invalid(problem)
    readonly = mode in READ_ONLY_MODES
    for flag in capability.mount.mount_flags:
        if flag == "ro":
            readonly = True
        elif flag != "rw" and "=" not in flag:
            invalid(
                f"mount flag {flag!r} is not supported (use ro, rw or FUSE options "
                f"k=v from: {', '.join(mount_options.OPTIONS)})"
            )
    return readonly


async def ask_mountd(
    action: str, answer: Awaitable[Any], overrides: dict[int, Status] | None = None
) -> Any:
    """Await a mountd call; its errno becomes the CSI status (docs/contracts.md), unless
    `overrides` says otherwise for this RPC."""
    try:
        return await answer
    except RPCUnavailable as exc:
        fail(Status.UNAVAILABLE, f"{action}: mountd unavailable: {exc.strerror or exc}")
    except OSError as exc:
        status = {**ERRNO_STATUS, **(overrides or {})}.get(exc.errno or 0, Status.INTERNAL)
        fail(status, f"{action}: {exc.strerror or exc}")


class TryLocks:
    """At most one call per (volume, target) at a time; a second one is ABORTED at once,
    as the CSI spec asks, and kubelet retries it later."""

    def __init__(self) -> None:
        self._held: set[tuple[str, str]] = set()

    @contextmanager
    def hold(self, volume_id: str, target: str) -> Iterator[None]:
        key = (volume_id, target)
        if key in self._held:
            fail(Status.ABORTED, f"an operation on volume {volume_id!r} at {target} is running")
        self._held.add(key)
        try:
            yield
        finally:
            self._held.discard(key)


class NodeService:
    def __init__(
        self,
        node_id: str,
        mountd: MountdClient,
        engines: Callable[[str], NodeEngine] = engine_registry.node_engine,
    ) -> None:
        self.node_id = node_id
        self.mountd = mountd
        self.engines = engines
        self.locks = TryLocks()

    async def NodeGetCapabilities(
        self, request: pb.NodeGetCapabilitiesRequest
    ) -> pb.NodeGetCapabilitiesResponse:
        return pb.NodeGetCapabilitiesResponse(
            capabilities=[pb.NodeServiceCapability(rpc=_Rpc(type=t)) for t in CAPABILITIES]
        )

    async def NodeGetInfo(self, request: pb.NodeGetInfoRequest) -> pb.NodeGetInfoResponse:
        return pb.NodeGetInfoResponse(node_id=self.node_id, max_volumes_per_node=0)

    async def NodePublishVolume(
        self, request: pb.NodePublishVolumeRequest
    ) -> pb.NodePublishVolumeResponse:
        require(request, "volume_id", "target_path", "volume_capability")
        try:
            # unpublish takes any id: one published by an older version must still go
            inputs.check_volume_id(request.volume_id)
            inputs.check_path(request.target_path)
        except ValueError as exc:
            invalid(str(exc))
        readonly = check_capability(request.volume_capability) or request.readonly
        flags = list(request.volume_capability.mount.mount_flags)
        context = dict(request.volume_context)
        secrets = dict(request.secrets)
        source = resolve_source(request.volume_id, context, flags, secrets, self.engines)
        mode = request.volume_capability.access_mode.mode
        with self.locks.hold(request.volume_id, request.target_path):
            answer = await ask_mountd(
                f"publish {request.volume_id} at {request.target_path}",
                self.mountd.publish(
                    volume_id=request.volume_id,
                    engine=source.cluster.engine,
                    cluster=source.cluster.address,
                    fs_path=source.fs_path,
                    subpath=source.subpath,
                    options=source.options,
                    target=request.target_path,
                    readonly=readonly,
                    secrets=dict(source.cluster.secrets),
                    pod_namespace=context.get(POD_NAMESPACE) or None,
                    pod_name=context.get(POD_NAME) or None,
                    # mountd checks it under the volume's lock: no second target on this node
                    single_writer=mode == _Mode.SINGLE_NODE_SINGLE_WRITER,
                ),
            )
        # the server logs every call; this adds which daemon serves it ("key" would be redacted)
        started = answer.get("daemon_started")
        details = fields(volume_id=request.volume_id, key_id=answer.get("key"), started=started)
        log.info("published", extra=details)
        return pb.NodePublishVolumeResponse()

    async def NodeUnpublishVolume(
        self, request: pb.NodeUnpublishVolumeRequest
    ) -> pb.NodeUnpublishVolumeResponse:
        require(request, "volume_id", "target_path")
        with self.locks.hold(request.volume_id, request.target_path):
            await ask_mountd(
                f"unpublish {request.volume_id} at {request.target_path}",
                self.mountd.unpublish(request.volume_id, request.target_path),
            )
        return pb.NodeUnpublishVolumeResponse()

    async def NodeGetVolumeStats(
        self, request: pb.NodeGetVolumeStatsRequest
    ) -> pb.NodeGetVolumeStatsResponse:
        require(request, "volume_id", "volume_path")
        # a path mountd refuses (relative, outside the kubelet dir) is simply not published
        stats = await ask_mountd(
            f"stats of {request.volume_path}",
            self.mountd.stats(request.volume_path),
            {errno.EINVAL: Status.NOT_FOUND, errno.EPERM: Status.NOT_FOUND},
        )
        if stats.get("volume_id") != request.volume_id:
            fail(
                Status.NOT_FOUND,
                f"volume {request.volume_id!r} is not published at {request.volume_path}",
            )
        usage = [
            _usage(pb.VolumeUsage.BYTES, *(stats.get(f"{k}_bytes") for k in USAGE_FIELDS)),
            _usage(pb.VolumeUsage.INODES, *(stats.get(f"{k}_inodes") for k in USAGE_FIELDS)),
        ]
        healthy = bool(stats.get("healthy"))
        return pb.NodeGetVolumeStatsResponse(
            usage=[u for u in usage if u is not None],
            volume_condition=pb.VolumeCondition(
                abnormal=not healthy, message=stats.get("message") or ("ok" if healthy else "")
            ),
        )

    async def mountd_ready(self) -> bool:
        """Identity's Probe: ready while mountd answers its ping."""
        try:
            return await self.mountd.ping(limit=PROBE_TIMEOUT) == "ok"
        except OSError:
            return False


USAGE_FIELDS = ("used", "max", "total", "free")  # mountd's stats: <field>_bytes, <field>_inodes


def _usage(
    unit: int, used: int | None, limit: int | None, total: int | None, free: int | None
) -> pb.VolumeUsage | None:
    """Bytes or inodes: the quota's limit, else the cluster's total (its statfs); available
    is what the limit leaves, never more than the cluster has free. Without a quota's usage,
    `used` is the cluster's (as df shows). 0 means unknown in CSI."""
    if used is None and total is not None and free is not None:
        used = total - free
    if used is None:
        return None
    limit = total if limit is None else limit
    if limit is None:
        return pb.VolumeUsage(unit=unit, used=used)
    available = limit - used if free is None else min(limit - used, free)
    return pb.VolumeUsage(unit=unit, used=used, total=limit, available=max(0, available))
