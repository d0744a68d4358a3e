"""CSI Controller service: one directory per volume on the cluster, with a quota.

A volume's directory is tagged `trusted.fusecsi.volume` = its volume id (the FUSE daemon hides
and refuses that namespace to applications) and `trusted.fusecsi.owner` = the CreateVolume name
holding it. The volume id carries a digest of the CreateVolume name, so a directory that a
later volume got at the same path (a PVC re-created under its old name) is not the old
volume's. DeleteVolume touches nothing that does not carry the tag for that very volume, never
removes or renames a volume nested inside another, and a cluster that does not answer is an
error, never "already gone". Directories a path-pattern needs between fs-path and a volume are
born tagged `trusted.fusecsi.parent`; DeleteVolume (on-delete delete) removes those, and only
those, again while they are empty.

A volume's directory is born tagged and sized: one `mkvolume` call, which the master makes
durable before it answers, so nobody ever sees the directory untagged or unlimited. The master
acknowledges other changes before they reach its disk, so every other change here (a quota,
an adoption, a delete) is followed by `sync_journal` before the CSI call answers.
"""

from __future__ import annotations

import errno
import logging
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, NoReturn

import trio
from grpclib.const import Status

from fusecsi.cluster.client import RENAME_NOREPLACE, ClusterClient, ClusterError
from fusecsi.csi.capabilities import capability_problem
from fusecsi.csi.generated import csi_pb2 as pb
from fusecsi.csi.validation import fail, invalid, require
from fusecsi.csi.volumes import (
    PVC_NAME,
    PVC_NAMESPACE,
    VolumeParams,
    VolumeRef,
    join,
    parse_parameters,
)
from fusecsi.errors import run_all
from fusecsi.events import Events
from fusecsi.k8s import KubeApi, KubeError, KubeUnavailable
from fusecsi.locks import KeyedLocks
from fusecsi.logs import fields
from fusecsi.metrics import Tally

log = logging.getLogger("fusecsi.controller")

DEFAULT_CAPACITY = 1 << 30  # CreateVolume without a capacity range gets 1 GiB
TAG_VOLUME = b"trusted.fusecsi.volume"
TAG_OWNER = b"trusted.fusecsi.owner"
# on a directory between fs-path and a volume that fusecsi made for a path-pattern (value:
# the fs-path it was made below); DeleteVolume removes it again once it is empty
TAG_PARENT = b"trusted.fusecsi.parent"
PARENT_MODE = 0o755
PARENT_ATTEMPTS = 4  # parents made again when a racing delete removed them meanwhile
VOLUME_MODE = 0o777  # pods run as any user; the volume is theirs alone
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


def fits(size: int, required: int, limit: int) -> bool:
    return (not required or size >= required) and (not limit or size <= limit)


ARCHIVE_ATTEMPTS = 10  # archive names tried when one is taken (two archives in one second)


def archive_name(name: str, now: float, attempt: int = 0) -> str:
    """`<name>.archived-<UTC time>[-<attempt>]`, the name shortened to stay within 255 bytes."""
    suffix = time.strftime(".archived-%Y%m%dT%H%M%SZ", time.gmtime(now))
    if attempt:
        suffix += f"-{attempt}"
    room = 255 - len(suffix)
    encoded = name.encode()
    if len(encoded) > room:
        name = encoded[:room].decode(errors="ignore")
    return name + suffix


def tag_ref(tag: bytes | None) -> VolumeRef | None:
    """The volume a directory's tag names, None when it names none."""
    try:
        return VolumeRef.from_volume_id(tag.decode()) if tag is not None else None
    except (ValueError, UnicodeDecodeError):
        return None


@contextmanager
def cluster_errors(where: str) -> Iterator[None]:
    """Cluster failures as CSI codes: no answer is UNAVAILABLE, never success."""
    try:
        yield
    except trio.TooSlowError:
        fail(Status.UNAVAILABLE, f"{where}: the cluster did not answer in time")
    except OSError as exc:  # ClusterError and ClusterUnavailable are OSErrors
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


class ClusterClients:
    """One open ClusterClient per (master-addrs, token), owned by the task running `run`
    and closed when it is cancelled."""

    def __init__(self, *, timeout: float) -> None:
        self.timeout = timeout
        self._clients: dict[tuple[str, str | None], ClusterClient] = {}
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
            self._clients.clear()

    async def get(self, master_addrs: str, token: str | None) -> ClusterClient:
        key = (master_addrs, token)
        client = self._clients.get(key)
        if client is not None:
            return client
        async with self._opening.hold(key):
            if key not in self._clients:
                if self._nursery is None:
                    fail(Status.UNAVAILABLE, "the controller is shutting down")
                client = ClusterClient(master_addrs.split(","), token=token, timeout=self.timeout)
                await self._nursery.start(self._hold, client)
                self._clients[key] = client
        return self._clients[key]

    async def _hold(self, client: ClusterClient, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        # the client owns a nursery: enter and leave it in this one task
        async with client:
            task_status.started()
            await trio.sleep_forever()


class ControllerService:
    def __init__(
        self,
        clients: ClusterClients,
        kube: KubeApi,
        *,
        default_token: str | None = None,
        call_timeout: float = 10.0,
        events: Events | None = None,
    ) -> None:
        self.clients = clients
        self.kube = kube
        self.events = events or Events(None, "fusecsi-controller")
        self.default_token = default_token
        self.call_timeout = call_timeout
        self._names = KeyedLocks()
        self._paths = KeyedLocks()
        # the last token that worked per cluster, for GetCapacity (whose request has none)
        self._tokens: dict[str, str | None] = {}

    # -- helpers ---------------------------------------------------------------------------

    def _token(self, request: Any) -> str | None:
        return request.secrets.get("token") or self.default_token

    async def _call(self, fn, *args, **kwargs):
        with trio.fail_after(self.call_timeout):
            return await fn(*args, **kwargs)

    async def _client(self, master_addrs: str, token: str | None) -> ClusterClient:
        return await self.clients.get(master_addrs, token)

    async def _together(self, *calls) -> list:
        """Independent cluster calls at once (one round trip's wait instead of several);
        their results in order. The first failure is raised as itself, not as a group."""
        return await run_all([partial(self._call, *call) for call in calls])

    def _accepted(self, client: ClusterClient) -> None:
        """The master answered this client: GetCapacity (whose request carries no secrets)
        may use its token."""
        self._tokens[",".join(client.master_addrs)] = client.token

    async def _tag(self, client: ClusterClient, ino: int, name: bytes) -> bytes | None:
        """The tag's value, None when there is none; any other error is the caller's."""
        try:
            return await self._call(client.getxattr, ino, name)
        except ClusterError as exc:
            if exc.errno == errno.ENODATA:
                return None
            raise

    async def _quota(self, client: ClusterClient, ino: int) -> int | None:
        """The directory's own quota limit (get_quota may answer an ancestor's)."""
        try:
            quota = await self._call(client.get_quota, ino)
        except ClusterError as exc:
            if exc.errno == errno.ENODATA:
                return None
            raise
        return quota.max_bytes if quota.ino == ino else None

    async def _find(self, client: ClusterClient, ref: VolumeRef):
        """(entry attr, tag) of the volume's directory; None where missing."""
        try:
            entry = await self._call(client.resolve, ref.path)
        except ClusterError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                raise
            entry = None
        self._accepted(client)
        if entry is None or not stat.S_ISDIR(entry.mode):
            return entry, None
        return entry, await self._tag(client, entry.ino, TAG_VOLUME)

    async def _volume_at(self, client: ClusterClient, path: str) -> bytes | None:
        """The volume tag of the directory at `path`; None when it is missing or untagged."""
        for attempt in range(PARENT_ATTEMPTS):
            try:
                entry = await self._call(client.resolve, path)
            except ClusterError as exc:
                if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                    raise
                return None
            if not stat.S_ISDIR(entry.mode):
                return None
            try:
                return await self._tag(client, entry.ino, TAG_VOLUME)
            except ClusterError as exc:
                # removed after it was resolved (an empty parent going with its last
                # volume): look again at what is at the path now
                if exc.errno != errno.ENOENT or attempt == PARENT_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    async def _refuse_nesting(self, client: ClusterClient, ref: VolumeRef) -> None:
        """FAILED_PRECONDITION when a directory above the volume's is a volume: deleting or
        archiving that one would take this one with it."""
        parts = ref.path.split("/")[1:-1]
        above = ["/" + "/".join(parts[: i + 1]) for i in range(len(parts))]
        tags = await self._together(*[(self._volume_at, client, path) for path in above])
        for path, tag in zip(above, tags, strict=True):
            if tag is not None:
                fail(
                    Status.FAILED_PRECONDITION,
                    f"{ref.path} would be inside volume {tag.decode(errors='replace')} at "
                    f"{path}; give path-pattern a layout where volumes do not nest",
                )

    async def _nested_volume(self, client: ClusterClient, entry, path: str) -> str | None:
        """The path of a volume somewhere inside the directory `entry` at `path`, if any."""
        todo = [(entry.ino, path)]
        while todo:
            ino, path = todo.pop()
            cookie = 0
            while batch := await self._call(client.readdir, ino, cookie):
                cookie = batch[-1][2]
                dirs = [(name, attr) for name, attr, _ in batch if stat.S_ISDIR(attr.mode)]
                tags = await self._together(
                    *[(self._tag, client, attr.ino, TAG_VOLUME) for _, attr in dirs]
                )
                for (name, attr), tag in zip(dirs, tags, strict=True):
                    child = f"{path}/{name.decode(errors='replace')}"
                    if tag is not None:
                        return child
                    todo.append((attr.ino, child))
        return None

    async def _subpath(self, name: str, params: VolumeParams) -> str:
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
            return params.subpath_for(name, labels, annotations)
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
            params = parse_parameters(request.parameters)
        except ValueError as exc:
            invalid(str(exc))
        token = self._token(request)
        async with self._names.hold(request.name):
            subpath = await self._subpath(request.name, params)
            try:
                ref = params.ref(subpath, request.name)
                volume_id = ref.volume_id()
            except ValueError as exc:
                invalid(str(exc))
            async with self._paths.hold(self._place(ref)):
                with cluster_errors(f"creating {ref.path} on {ref.master_addrs}"):
                    client = await self._client(ref.master_addrs, token)
                    capacity = await self._ensure(
                        client, ref, volume_id, request.name, size, required, limit
                    )
        self._warn_if_never_deleted(params, ref)
        return pb.CreateVolumeResponse(
            volume=pb.Volume(
                volume_id=volume_id,
                capacity_bytes=capacity,
                volume_context=ref.context(params.options),
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

    async def _ensure(self, client, ref, volume_id, name, size, required, limit) -> int:
        """The volume's directory exists, tagged for `volume_id` and held by `name`; returns
        its quota."""
        tags = {TAG_VOLUME: volume_id.encode(), TAG_OWNER: name.encode()}
        await self._refuse_nesting(client, ref)
        try:
            await self._mkvolume(client, ref, tags, size)
            created = True
        except ClusterError as exc:
            if exc.errno != errno.EEXIST:
                raise
            created = False
        self._accepted(client)
        if not created:
            return await self._existing_volume(client, ref, volume_id, name, size, required, limit)
        log.info(
            "volume created",
            extra=fields(volume_id=volume_id, path=ref.path, capacity=size, name=name),
        )
        VOLUMES_CREATED.add(ref.on_delete)
        return size

    async def _mkvolume(self, client, ref, tags: dict, size: int) -> None:
        """The master resolves the parent path and makes the directory in one step: no inode
        of ours can be stale (a renamed parent, a rebuilt cluster)."""
        make = (client.mkvolume, ref.parent_path, ref.name.encode(), VOLUME_MODE, tags, size)
        for attempt in range(PARENT_ATTEMPTS):
            try:
                if attempt:
                    # the first volume under its parent, or a racing DeleteVolume (in another
                    # controller) removed a parent it had just left empty: make it (again)
                    await self._make_parents(client, ref)
                await self._call(*make)
                return
            except ClusterError as exc:
                if exc.errno != errno.ENOENT or attempt == PARENT_ATTEMPTS - 1:
                    raise

    async def _make_parents(self, client, ref: VolumeRef) -> None:
        """fs-path (untagged: the StorageClass's, never removed by fusecsi), then each
        directory between it and the volume that is missing, born tagged TAG_PARENT (one
        durable mkvolume without a quota) so that DeleteVolume may remove it when empty."""
        await self._call(client.mkdirs, ref.fs_path)
        here = ref.fs_path
        for part in ref.subpath.split("/")[:-1]:
            tags = {TAG_PARENT: ref.fs_path.encode()}
            try:
                await self._call(client.mkvolume, here, part.encode(), PARENT_MODE, tags, None)
                log.info("parent directory created", extra=fields(path=join(here, part)))
            except ClusterError as exc:
                if exc.errno != errno.EEXIST:  # there already, made by whoever: used as is
                    raise
            here = join(here, part)

    async def _remove_empty_parents(self, client, ref: VolumeRef) -> int:
        """Bottom-up, each directory between the volume's and fs-path that fusecsi made
        (tagged TAG_PARENT) while it is empty; how many were removed. A directory not
        tagged, not empty (another volume, or a create racing this one) or gone ends the
        walk; fs-path and what is above it are never touched."""
        parts = ref.subpath.split("/")[:-1]
        removed = 0
        while parts:
            path, above = join(ref.fs_path, "/".join(parts)), ref.fs_path
            if len(parts) > 1:
                above = join(ref.fs_path, "/".join(parts[:-1]))
            try:
                entry = await self._call(client.resolve, path)
                if not stat.S_ISDIR(entry.mode):
                    break
                if await self._tag(client, entry.ino, TAG_PARENT) is None:
                    break  # not made by fusecsi: never removed
                parent = await self._call(client.resolve, above)
                await self._call(client.rmdir, parent.ino, parts[-1].encode())
            except ClusterError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT, errno.ENOTDIR):
                    break
                raise
            log.info("empty parent directory removed", extra=fields(path=path))
            removed += 1
            parts.pop()
        return removed

    async def _existing_volume(self, client, ref, volume_id, name, size, required, limit) -> int:
        """CreateVolume for a name that exists: the same volume again, or a retained one."""
        try:
            entry = await self._call(client.resolve, ref.path)
        except ClusterError as exc:
            if exc.errno != errno.ENOENT:
                raise
            fail(Status.ABORTED, f"{ref.path} changed while being created; retry")
        if not stat.S_ISDIR(entry.mode):
            fail(Status.ALREADY_EXISTS, f"{ref.path} exists and is not a directory")
        tag, owner, quota = await self._together(
            (self._tag, client, entry.ino, TAG_VOLUME),
            (self._tag, client, entry.ino, TAG_OWNER),
            (self._quota, client, entry.ino),
        )
        if tag is None:
            fail(Status.ALREADY_EXISTS, f"{ref.path} exists and was not created by fusecsi")
        held = tag_ref(tag)
        ours = owner in (None, name.encode()) and held is not None and ref.same_but_digest(held)
        if ours and tag != volume_id.encode():
            # a retained volume's directory, or this one made under a version 1 id: tagged
            # for this volume first, so the old volume's DeleteVolume no longer matches it
            await self._durably(client, client.setxattr, entry.ino, TAG_VOLUME, volume_id.encode())
            tag = volume_id.encode()
        if ours and owner is None:  # released by DeleteVolume (retain): adopt it
            await self._together(
                (client.setxattr, entry.ino, TAG_OWNER, name.encode()),
                (client.set_quota, entry.ino, size, None),
            )
            await self._call(client.sync_journal)
            log.info("volume adopted", extra=fields(volume_id=volume_id, path=ref.path, name=name))
            VOLUMES_CREATED.add(ref.on_delete)
            return size
        if owner is not None and owner != name.encode():
            fail(
                Status.ALREADY_EXISTS,
                f"{ref.path} is in use by volume {owner.decode(errors='replace')!r}: a PV "
                "kept by reclaimPolicy Retain (move its directory aside: fusecsi fs "
                f"--master-addrs {ref.master_addrs} mv {ref.path} {ref.path}.retained), or "
                "another claim on the same path (give path-pattern a placeholder that tells "
                "volumes apart)",
            )
        if tag != volume_id.encode():
            other = tag.decode(errors="replace")
            fail(Status.ALREADY_EXISTS, f"{ref.path} belongs to another volume ({other})")
        if quota is None:
            await self._durably(client, client.set_quota, entry.ino, size, None)
            return size
        if not fits(quota, required, limit):
            fail(
                Status.ALREADY_EXISTS,
                f"volume {name!r} exists with capacity {quota}, incompatible with "
                f"required {required} / limit {limit}",
            )
        return quota

    async def DeleteVolume(self, request: pb.DeleteVolumeRequest) -> pb.DeleteVolumeResponse:
        require(request, "volume_id")
        try:
            ref = VolumeRef.from_volume_id(request.volume_id)
        except ValueError as exc:
            # the spec: a volume that does not exist is deleted; this one cannot exist
            log.info("not a fusecsi volume id", extra=fields(error=str(exc)))
            return pb.DeleteVolumeResponse()
        volume_id = ref.volume_id()
        token = self._token(request)
        async with self._paths.hold(self._place(ref)):
            with cluster_errors(f"deleting {ref.path} on {ref.master_addrs}"):
                client = await self._client(ref.master_addrs, token)
                entry, tag = await self._find(client, ref)
                if entry is None:
                    log.info("volume already gone", extra=fields(volume_id=volume_id))
                    # a call that failed after removing the volume: its empty parents too
                    if ref.on_delete == "delete" and await self._remove_empty_parents(client, ref):
                        await self._call(client.sync_journal)
                    return pb.DeleteVolumeResponse()
                if tag != volume_id.encode() and tag_ref(tag) is not None:
                    # another volume has the directory now (its path was given again): the
                    # one asked for is gone, and what is there is not ours to touch
                    log.info(
                        "volume already gone; its directory belongs to another volume",
                        extra=fields(volume_id=volume_id, path=ref.path, tag=tag),
                    )
                    return pb.DeleteVolumeResponse()
                if tag != volume_id.encode():
                    self._refuse_delete(
                        ref,
                        volume_id,
                        "it carries no fusecsi tag"
                        if tag is None
                        else f"it is tagged {tag.decode(errors='replace')!r}, "
                        f"not as fusecsi volume {volume_id}",
                    )
                if ref.on_delete != "retain":  # retain leaves the whole tree where it is
                    nested = await self._nested_volume(client, entry, ref.path)
                    if nested is not None:
                        self._refuse_delete(ref, volume_id, f"volume {nested} is inside it")
                await self._apply_policy(client, ref, entry, volume_id)
                if ref.on_delete == "delete":  # archive and retain leave a directory there
                    await self._remove_empty_parents(client, ref)
                await self._call(client.sync_journal)
                VOLUMES_DELETED.add(ref.on_delete)
        return pb.DeleteVolumeResponse()

    def _refuse_delete(self, ref: VolumeRef, volume_id: str, why: str) -> NoReturn:
        log.warning("refusing to delete", extra=fields(volume_id=volume_id, path=ref.path, why=why))
        message = f"refusing to {ref.on_delete} {ref.path}: {why}; nothing was changed"
        DELETE_REFUSALS.add()
        self.events.post_on_volume(volume_id, "DeleteRefused", message)
        fail(Status.FAILED_PRECONDITION, message)

    @staticmethod
    def _place(ref: VolumeRef) -> tuple[str, str]:
        """The lock for changes at `ref.path`. Volumes that could nest share their first
        path segment, so one lock for them makes create's nesting check and its mkvolume
        one step."""
        return ref.master_addrs, ref.path.split("/")[1]

    async def _apply_policy(self, client, ref: VolumeRef, entry, volume_id: str) -> None:
        if ref.on_delete == "delete":
            await self._call(client.remove_tree, ref.path)
            log.info("volume deleted", extra=fields(volume_id=volume_id, path=ref.path))
        elif ref.on_delete == "archive":
            parent = await self._call(client.resolve, ref.parent_path)
            now = time.time()
            for attempt in range(ARCHIVE_ATTEMPTS):
                new_name = archive_name(ref.name, now, attempt)
                try:
                    await self._call(
                        client.rename,
                        parent.ino,
                        ref.name.encode(),
                        parent.ino,
                        new_name.encode(),
                        RENAME_NOREPLACE,
                    )
                    break
                except ClusterError as exc:  # that name is taken: the next one
                    if exc.errno != errno.EEXIST or attempt == ARCHIVE_ATTEMPTS - 1:
                        raise
            log.info(
                "volume archived",
                extra=fields(volume_id=volume_id, path=ref.path, archived_as=new_name),
            )
        else:  # retain: keep everything, release the directory for a later claim to adopt
            try:
                await self._call(client.removexattr, entry.ino, TAG_OWNER)
            except ClusterError as exc:
                if exc.errno != errno.ENODATA:
                    raise
            log.info("volume retained", extra=fields(volume_id=volume_id, path=ref.path))

    @staticmethod
    def _parse_existing(volume_id: str) -> VolumeRef:
        try:
            return VolumeRef.from_volume_id(volume_id)
        except ValueError as exc:
            fail(Status.NOT_FOUND, f"no such volume: {exc}")

    async def _existing(self, ref: VolumeRef, request: Any) -> tuple[ClusterClient, Any]:
        """The volume's client and directory; NOT_FOUND unless it exists and is tagged."""
        volume_id = ref.volume_id()
        client = await self._client(ref.master_addrs, self._token(request))
        entry, tag = await self._find(client, ref)
        if entry is None or tag != volume_id.encode():
            fail(Status.NOT_FOUND, f"volume {volume_id} does not exist")
        return client, entry

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
        ref = self._parse_existing(request.volume_id)
        async with self._paths.hold(self._place(ref)):
            with cluster_errors(f"expanding {ref.path} on {ref.master_addrs}"):
                client, entry = await self._existing(ref, request)
                current = await self._quota(client, entry.ino)
                if current is not None and target < current:
                    invalid(f"cannot shrink volume from {current} to {target} bytes")
                if current != target:
                    await self._set_quota(client, entry.ino, target, request.volume_id)
                    log.info(
                        "volume expanded",
                        extra=fields(volume_id=request.volume_id, old=current, new=target),
                    )
        return pb.ControllerExpandVolumeResponse(
            capacity_bytes=target, node_expansion_required=False
        )

    async def _durably(self, client, fn, *args) -> None:
        """`fn(*args)`, then wait until the master has it on disk (it answers once written)."""
        await self._call(fn, *args)
        await self._call(client.sync_journal)

    async def _set_quota(self, client, ino: int, size: int, volume_id: str) -> None:
        try:
            await self._durably(client, client.set_quota, ino, size, None)
        except Exception as exc:
            QUOTA_UPDATES.add("failed")
            self.events.post_on_volume(
                volume_id,
                "QuotaUpdateFailed",
                f"setting the quota of volume {volume_id} to {size} bytes failed: "
                f"{type(exc).__name__}: {exc}",
            )
            raise
        QUOTA_UPDATES.add("ok")

    async def ValidateVolumeCapabilities(
        self, request: pb.ValidateVolumeCapabilitiesRequest
    ) -> pb.ValidateVolumeCapabilitiesResponse:
        require(request, "volume_id", "volume_capabilities")
        ref = self._parse_existing(request.volume_id)
        with cluster_errors(f"looking up {ref.path} on {ref.master_addrs}"):
            await self._existing(ref, request)
        problems = [p for p in map(capability_problem, request.volume_capabilities) if p]
        if request.parameters:
            try:
                parse_parameters(request.parameters, require_master=False)
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
        Without master-addrs there is no cluster to ask: 0, as the spec allows."""
        try:
            params = parse_parameters(request.parameters, require_master=False)
        except ValueError as exc:
            invalid(str(exc))
        if params.master_addrs is None:
            return pb.GetCapacityResponse(available_capacity=0)
        if any(map(capability_problem, request.volume_capabilities)):
            return pb.GetCapacityResponse(available_capacity=0)
        token = self._tokens.get(params.master_addrs, self.default_token)
        with cluster_errors(f"asking {params.master_addrs} for free space"):
            client = await self.clients.get(params.master_addrs, token)
            free = (await self._call(client.statfs))["free_bytes"]
            try:
                base = await self._call(client.resolve, params.fs_path)
                quota = await self._call(client.get_quota, base.ino)
            except ClusterError as exc:
                if exc.errno not in (errno.ENOENT, errno.ENODATA):
                    raise
            else:
                if quota.max_bytes is not None:
                    free = min(free, max(0, quota.max_bytes - quota.used_bytes))
        return pb.GetCapacityResponse(available_capacity=free)
