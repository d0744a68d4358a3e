"""CSI Controller service: CSI translation of the volume rules (volume_rules.py here).

Here: request validation, which engine and cluster a request names (StorageClass parameters
through the engine's `parse_cluster`, or the volume id), its secrets (the request's, else
the controller's defaults, never logged), CSI codes for every outcome, metrics and Events.
The rules — what is created, found, expanded, released, and what is never touched — live
in volume_rules on the engine seam's Namespace, which this module reaches only through
`fusecsi.engines` (NamespacePool).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, NoReturn

import trio
from grpclib.const import Status

from fusecsi import engines
from fusecsi.csi.capabilities import capability_problem
from fusecsi.csi.controller.namespace_pool import NamespacePool
from fusecsi.csi.controller.volume_rules import (  # noqa: F401  (archive_name, ARCHIVE_ATTEMPTS: re-exported)
    ARCHIVE_ATTEMPTS,
    AlreadyExists,
    CannotShrink,
    Changed,
    DeleteRefused,
    Nesting,
    NoSuchVolume,
    VolumeRules,
    archive_name,
)
from fusecsi.csi.generated import csi_pb2 as pb
from fusecsi.csi.validation import fail, invalid, require
from fusecsi.csi.volumes import (
    PVC_NAME,
    PVC_NAMESPACE,
    VolumeParams,
    VolumeRef,
    parse_parameters,
)
from fusecsi.engines.base import BadParameter, Cluster, Namespace
from fusecsi.events import Events
from fusecsi.k8s import KubeApi, KubeError, KubeUnavailable
from fusecsi.locks import KeyedLocks
from fusecsi.logs import fields
from fusecsi.metrics import Tally

log = logging.getLogger("fusecsi.controller")

DEFAULT_CAPACITY = 1 << 30  # CreateVolume without a capacity range gets 1 GiB
UNAVAILABLE_ERRNOS = {
    errno.ETIMEDOUT,
    errno.ECONNREFUSED,
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.EPIPE,
}

VOLUMES_CREATED = Tally(
    "fusecsi_controller_volumes_created_total",
    "volume directories created (or adopted) by CreateVolume, by on-delete policy",
    ["on_delete"],
)
VOLUMES_DELETED = Tally(
    "fusecsi_controller_volumes_deleted_total",
    "volumes DeleteVolume released, by on-delete policy (delete, archive, retain)",
    ["on_delete"],
)
QUOTA_UPDATES = Tally(
    "fusecsi_controller_quota_updates_total",
    "quota changes by ControllerExpandVolume, by result (ok, failed)",
    ["result"],
)
DELETE_REFUSALS = Tally(
    "fusecsi_controller_delete_refusals_total",
    "DeleteVolume calls refused: the directory is not tagged for the volume or holds another",
)
METRICS = (VOLUMES_CREATED, VOLUMES_DELETED, QUOTA_UPDATES, DELETE_REFUSALS)

_Rpc = pb.ControllerServiceCapability.RPC
CAPABILITIES = (
    _Rpc.CREATE_DELETE_VOLUME,
    _Rpc.EXPAND_VOLUME,
    _Rpc.GET_CAPACITY,
    _Rpc.SINGLE_NODE_MULTI_WRITER,
)


# the largest quota a volume gets: 2^63-1 (what a PVC of "8Ei" asks) would be no limit at all
MAX_CAPACITY = 1 << 60


def capacity_range(request: Any) -> tuple[int, int]:
    """(required, limit) bytes, 0 meaning unset."""
    if not request.HasField("capacity_range"):
        return 0, 0
    required, limit = request.capacity_range.required_bytes, request.capacity_range.limit_bytes
    if required < 0 or limit < 0:
        invalid("capacity_range must not be negative")
    if limit and required > limit:
        invalid(f"capacity_range required_bytes {required} exceeds limit_bytes {limit}")
    if required > MAX_CAPACITY:
        fail(
            Status.OUT_OF_RANGE,
            f"capacity_range required_bytes {required} is more than a volume can have "
            f"(at most {MAX_CAPACITY} bytes, 1 EiB)",
        )
    return required, limit


@contextmanager
def as_csi_errors(where: str) -> Iterator[None]:
    """Rule outcomes and engine failures as CSI codes: no answer is UNAVAILABLE, never
    success."""
    try:
        yield
    except trio.TooSlowError:
        fail(Status.UNAVAILABLE, f"{where}: the cluster did not answer in time")
    except (AlreadyExists, Changed, Nesting, NoSuchVolume, CannotShrink) as exc:
        code = {
            AlreadyExists: Status.ALREADY_EXISTS,
            Changed: Status.ABORTED,
            Nesting: Status.FAILED_PRECONDITION,
            NoSuchVolume: Status.NOT_FOUND,
            CannotShrink: Status.INVALID_ARGUMENT,
        }[type(exc)]
        fail(code, str(exc))
    except BadParameter as exc:
        invalid(str(exc))
    except OSError as exc:  # the seam's errors, Unreachable included, are OSErrors
        code = exc.errno or errno.EIO
        text = f"{where}: {errno.errorcode.get(code, code)} {exc.strerror or exc}"
        if code in UNAVAILABLE_ERRNOS:
            fail(Status.UNAVAILABLE, text)
        if code == errno.ENOENT:  # the expected ones are handled where they can happen
            fail(Status.ABORTED, f"{text} (changed while being examined; retry)")
        if code in (errno.EACCES, errno.EPERM):
            fail(Status.PERMISSION_DENIED, text)
        if code in (errno.ENOSPC, errno.EDQUOT):
            fail(Status.RESOURCE_EXHAUSTED, text)
        if code in (errno.ENOTDIR, errno.EEXIST):  # a file where a directory should be
            fail(Status.FAILED_PRECONDITION, text)
        if code in (errno.EINVAL, errno.ENAMETOOLONG):
            fail(Status.INVALID_ARGUMENT, text)
        fail(Status.INTERNAL, text)


class ControllerService:
    def __init__(
        self,
        namespaces: NamespacePool,
        kube: KubeApi,
        *,
        default_secrets: Mapping[str, Mapping[str, str]] | None = None,
        call_timeout: float = 10.0,
        events: Events | None = None,
        registry: Any = engines,
    ) -> None:
        self.namespaces = namespaces
        self.registry = registry  # `node_engine(name)`: fusecsi.engines; tests give a fake
        self.kube = kube
        self.events = events or Events(None, "fusecsi-controller")
        # per engine, the secrets of requests that carry none (the embedded cluster's token
        # from --token-file); never logged
        self.default_secrets = {k: dict(v) for k, v in (default_secrets or {}).items()}
        self.rules = VolumeRules(call_timeout=call_timeout)
        self._names = KeyedLocks()
        # the last secrets that worked per cluster (and per StorageClass parameters), for
        # GetCapacity, whose request has none
        self._working_secrets: dict[tuple, dict[str, str]] = {}

    # -- helpers ---------------------------------------------------------------------------

    def _secrets(self, engine: str, request: Any) -> dict[str, str]:
        """The request's secrets over the engine's defaults (an empty value is no value)."""
        given = {k: v for k, v in getattr(request, "secrets", {}).items() if v}
        return {**self.default_secrets.get(engine, {}), **given}

    def _node_engine(self, name: str) -> Any:
        """The engine's node half (for parse_cluster); INVALID_ARGUMENT when this build
        lacks it."""
        try:
            return self.registry.node_engine(name)
        except BadParameter as exc:
            invalid(str(exc))
        except (ImportError, AttributeError):
            invalid(f"engine {name!r} is not available in this build of fusecsi")

    async def _namespace(self, cluster: Cluster) -> Namespace:
        return await self.namespaces.get(cluster)

    def _worked(self, cluster: Cluster, params: VolumeParams | None = None) -> None:
        """The cluster answered with these secrets: GetCapacity may use them."""
        secrets = dict(cluster.secrets)
        self._working_secrets[cluster.engine, cluster.address] = secrets
        if params is not None:
            self._working_secrets[_params_key(params)] = secrets

    @staticmethod
    def _volume_cluster(ref: VolumeRef, secrets: Mapping[str, str]) -> Cluster:
        return Cluster(ref.engine, ref.address, secrets)

    async def _subpath(self, name: str, params: VolumeParams, cluster: Cluster) -> str:
        labels = annotations = None
        claim_ref = ""
        if params.pattern is not None and params.pattern.needs_api:
            namespace, claim = params.metadata.get(PVC_NAMESPACE), params.metadata.get(PVC_NAME)
            if not namespace or not claim:
                invalid(
                    "path-pattern uses PVC labels or annotations but the request has no "
                    f"{PVC_NAMESPACE}/{PVC_NAME} (run external-provisioner with "
                    "--extra-create-metadata)"
                )
            try:
                meta = await self.kube.pvc_metadata(namespace, claim)
            except KubeUnavailable as exc:
                fail(Status.UNAVAILABLE, f"path-pattern: {exc}")
            except KubeError as exc:
                fail(Status.FAILED_PRECONDITION, f"path-pattern: {exc}")
            labels, annotations = meta.labels, meta.annotations
            claim_ref = f"{namespace}/{claim}"
        try:
            return params.subpath_for(name, labels, annotations, address=cluster.address)
        except ValueError as exc:
            if not claim_ref:
                invalid(str(exc))
            # made from the PVC's labels or annotations: the user fixes the PVC, and
            # FAILED_PRECONDITION is retried with the normal backoff (INVALID_ARGUMENT only
            # after about 5 minutes)
            fail(Status.FAILED_PRECONDITION, f"{exc}: fix PVC {claim_ref}")

    # -- RPCs ------------------------------------------------------------------------------

    async def ControllerGetCapabilities(self, request) -> pb.ControllerGetCapabilitiesResponse:
        Cap = pb.ControllerServiceCapability
        return pb.ControllerGetCapabilitiesResponse(
            capabilities=[Cap(rpc=Cap.RPC(type=t)) for t in CAPABILITIES]
        )

    async def CreateVolume(self, request: pb.CreateVolumeRequest) -> pb.CreateVolumeResponse:
        require(request, "name", "volume_capabilities")
        for cap in request.volume_capabilities:
            problem = capability_problem(cap)
            if problem:
                invalid(problem)
        required, limit = capacity_range(request)
        size = required or limit or DEFAULT_CAPACITY
        if request.HasField("volume_content_source"):
            invalid("volume_content_source is not supported (no snapshots or clones)")
        if request.mutable_parameters:
            invalid("mutable_parameters are not supported (no volume attributes classes)")
        try:
            params = parse_parameters(request.parameters, node_engine=self._node_engine)
        except ValueError as exc:
            invalid(str(exc))
        secrets = self._secrets(params.engine, request)
        try:
            cluster = self._node_engine(params.engine).parse_cluster(params.cluster_params, secrets)
        except BadParameter as exc:
            invalid(str(exc))
        async with self._names.hold(request.name):
            subpath = await self._subpath(request.name, params, cluster)
            try:
                ref = params.ref(subpath, request.name, address=cluster.address)
                volume_id = ref.volume_id()
            except ValueError as exc:
                invalid(str(exc))
            with as_csi_errors(f"creating {ref.path} on {ref.address}"):
                namespace = await self._namespace(cluster)
                ensured = await self.rules.ensure(
                    namespace, ref, request.name, size, required, limit
                )
            self._worked(cluster, params)
        if ensured.how != "exists":
            VOLUMES_CREATED.add(ref.on_delete)
        if not namespace.quota_enforced and ensured.how == "created":
            log.info(
                "quota recorded, not enforced by this engine",
                extra=fields(volume_id=volume_id, engine=ref.engine, capacity=ensured.capacity),
            )
        self._warn_if_never_deleted(params, ref)
        return pb.CreateVolumeResponse(
            volume=pb.Volume(
                volume_id=volume_id,
                capacity_bytes=ensured.capacity,
                volume_context=params.context(ref),
            )
        )

    def _warn_if_never_deleted(self, params: VolumeParams, ref: VolumeRef) -> None:
        """A Warning Event on the PVC when its StorageClass has reclaimPolicy Retain and
        on-delete is not retain: Kubernetes never calls DeleteVolume then, so on-delete never
        runs. Queued (never delays or fails CreateVolume); once per claim."""
        if ref.on_delete == "retain":
            return
        namespace, claim = params.metadata.get(PVC_NAMESPACE), params.metadata.get(PVC_NAME)
        if not namespace or not claim:
            return  # no --extra-create-metadata: no PVC to read or to tell
        kube, policy, path = self.kube, ref.on_delete, ref.path

        async def message(pvc: dict) -> str | None:
            spec, meta = pvc.get("spec") or {}, pvc.get("metadata") or {}
            name = spec.get("storageClassName") or (meta.get("annotations") or {}).get(
                "volume.beta.kubernetes.io/storage-class"
            )
            if not name:
                return None
            storage_class = await kube.run(kube.read_storage_class, name)
            if storage_class.get("reclaimPolicy") != "Retain":
                return None
            return (
                f"StorageClass {name} has reclaimPolicy Retain, so Kubernetes never calls "
                f"DeleteVolume and its on-delete: {policy} never runs: {path} stays, held by "
                "the PV, when this claim is deleted. Set on-delete: retain to say so, or "
                "reclaimPolicy: Delete to have on-delete applied"
            )

        self.events.post_on_claim(
            namespace,
            claim,
            "OnDeleteNeverRuns",
            message,
            about=f"whether reclaimPolicy Retain keeps on-delete: {policy} from running",
        )

    async def DeleteVolume(self, request: pb.DeleteVolumeRequest) -> pb.DeleteVolumeResponse:
        require(request, "volume_id")
        try:
            ref = VolumeRef.from_volume_id(request.volume_id)
        except ValueError as exc:
            # the spec: a volume that does not exist is deleted; this one cannot exist
            log.info("not a fusecsi volume id", extra=fields(error=str(exc)))
            return pb.DeleteVolumeResponse()
        cluster = self._volume_cluster(ref, self._secrets(ref.engine, request))
        with as_csi_errors(f"deleting {ref.path} on {ref.address}"):
            try:
                done = await self.rules.release(await self._namespace(cluster), ref)
            except DeleteRefused as exc:
                self._refused(ref, exc)
        self._worked(cluster)
        if done != "gone":
            VOLUMES_DELETED.add(ref.on_delete)
        return pb.DeleteVolumeResponse()

    def _refused(self, ref: VolumeRef, exc: DeleteRefused) -> NoReturn:
        volume_id = ref.volume_id()
        log.warning(
            "refusing to delete", extra=fields(volume_id=volume_id, path=ref.path, why=exc.why)
        )
        DELETE_REFUSALS.add()
        self.events.post_on_volume(volume_id, "DeleteRefused", str(exc))
        fail(Status.FAILED_PRECONDITION, str(exc))

    @staticmethod
    def _ref_or_not_found(volume_id: str) -> VolumeRef:
        try:
            return VolumeRef.from_volume_id(volume_id)
        except ValueError as exc:
            fail(Status.NOT_FOUND, f"no such volume: {exc}")

    async def ControllerExpandVolume(
        self, request: pb.ControllerExpandVolumeRequest
    ) -> pb.ControllerExpandVolumeResponse:
        require(request, "volume_id", "capacity_range")
        required, limit = capacity_range(request)
        target = required or limit
        if not target:
            invalid("capacity_range has neither required_bytes nor limit_bytes")
        if request.HasField("volume_capability"):
            problem = capability_problem(request.volume_capability)
            if problem:
                invalid(problem)
        ref = self._ref_or_not_found(request.volume_id)
        cluster = self._volume_cluster(ref, self._secrets(ref.engine, request))

        def quota_failed(exc: BaseException) -> None:
            QUOTA_UPDATES.add("failed")
            self.events.post_on_volume(
                request.volume_id,
                "QuotaUpdateFailed",
                f"setting the quota of volume {request.volume_id} to {target} bytes failed: "
                f"{type(exc).__name__}: {exc}",
            )

        with as_csi_errors(f"expanding {ref.path} on {ref.address}"):
            namespace = await self._namespace(cluster)
            old = await self.rules.expand(namespace, ref, target, on_failure=quota_failed)
        self._worked(cluster)
        if old != target:
            QUOTA_UPDATES.add("ok")
        return pb.ControllerExpandVolumeResponse(
            capacity_bytes=target, node_expansion_required=False
        )

    async def ValidateVolumeCapabilities(
        self, request: pb.ValidateVolumeCapabilitiesRequest
    ) -> pb.ValidateVolumeCapabilitiesResponse:
        require(request, "volume_id", "volume_capabilities")
        ref = self._ref_or_not_found(request.volume_id)
        cluster = self._volume_cluster(ref, self._secrets(ref.engine, request))
        with as_csi_errors(f"looking up {ref.path} on {ref.address}"):
            await self.rules.existing(await self._namespace(cluster), ref)
        problems = [p for p in map(capability_problem, request.volume_capabilities) if p]
        if request.parameters:
            try:
                parse_parameters(
                    request.parameters, require_master=False, node_engine=self._node_engine
                )
            except ValueError as exc:
                problems.append(str(exc))
        if request.mutable_parameters:
            problems.append("mutable_parameters are not supported")
        if problems:
            return pb.ValidateVolumeCapabilitiesResponse(message="; ".join(problems))
        confirmed = pb.ValidateVolumeCapabilitiesResponse.Confirmed(
            volume_context=request.volume_context,
            volume_capabilities=request.volume_capabilities,
            parameters=request.parameters,
        )
        return pb.ValidateVolumeCapabilitiesResponse(confirmed=confirmed)

    async def GetCapacity(self, request: pb.GetCapacityRequest) -> pb.GetCapacityResponse:
        """Free space of the cluster named in the parameters (bounded by a quota on fs-path).
        Without a cluster to ask (no master-addrs; another engine's cluster whose secrets
        no call has brought yet): 0, as the spec allows."""
        try:
            params = parse_parameters(
                request.parameters, require_master=False, node_engine=self._node_engine
            )
        except ValueError as exc:
            invalid(str(exc))
        if not params.cluster_params:
            return pb.GetCapacityResponse(available_capacity=0)
        if any(map(capability_problem, request.volume_capabilities)):
            return pb.GetCapacityResponse(available_capacity=0)
        engine = self._node_engine(params.engine)
        secrets = self._capacity_secrets(params, engine)
        try:
            cluster = engine.parse_cluster(params.cluster_params, secrets)
        except BadParameter as exc:
            if _params_key(params) not in self._working_secrets:
                return pb.GetCapacityResponse(available_capacity=0)
            invalid(str(exc))
        with as_csi_errors(f"asking {cluster.address} for free space"):
            free = await self.rules.capacity(await self._namespace(cluster), params.fs_path)
        return pb.GetCapacityResponse(available_capacity=free)

    def _capacity_secrets(self, params: VolumeParams, engine) -> dict[str, str]:
        """The secrets that last worked for these parameters or this cluster, else the
        defaults."""
        found = self._working_secrets.get(_params_key(params))
        if found is not None:
            return found
        defaults = self.default_secrets.get(params.engine, {})
        try:
            cluster = engine.parse_cluster(params.cluster_params, defaults)
        except BadParameter:
            return defaults
        return self._working_secrets.get((cluster.engine, cluster.address), defaults)


def _params_key(params: VolumeParams) -> tuple:
    return ("parameters", params.engine, frozenset(params.cluster_params.items()))
