"""The CSI controller service on a fake engine (fake_namespace.py says why it is a fake): the
volume rules must hold for any Namespace, including one whose mkdir_tagged is not atomic,
one whose quotas are not enforced, and one that stops answering.

The service runs in-process (its RPC methods called directly); every test runs with the
fake in the embedded engine's slot (version 2 ids, master-addrs) and in another engine's
(version 3 ids, the engine's own parameters). After every successful RPC nothing may be
left unsynced.
"""

from __future__ import annotations

import errno
import logging
import re

import pytest
import trio
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from support.fake_namespace import FakeRegistry, FakeTree

from fusecsi.csi.controller.namespace_pool import NamespacePool
from fusecsi.csi.controller.service import ControllerService
from fusecsi.csi.controller.volume_rules import TAG_OWNER, TAG_PARENT, TAG_VOLUME
from fusecsi.csi.generated import csi_pb2 as pb
from fusecsi.csi.volumes import VolumeRef, name_digest
from fusecsi.engines.base import Unreachable

GiB = 1 << 30
SECRET = "s3cr3t-token-value"

# (engine slot, StorageClass parameters naming the cluster, the cluster's address)
SLOTS = {
    "embedded": ({"master-addrs": "M1:7000"}, "m1:7000"),
    "seaweedfs": ({"engine": "seaweedfs", "filer": "filer-1:8888"}, "filer-1:8888"),
}


class Harness:
    def __init__(self, registry: FakeRegistry, service: ControllerService, slot: str) -> None:
        self.registry, self.service, self.slot = registry, service, slot
        self.cluster_params, self.address = SLOTS[slot]

    @property
    def tree(self) -> FakeTree:
        return self.registry.tree(self.slot, self.address)

    def params(self, **extra: str) -> dict[str, str]:
        return {**self.cluster_params, **extra}

    async def call(self, method: str, request):
        reply = await getattr(self.service, method)(request)
        assert self.tree.unsynced == 0, f"{method} answered with changes not synced"
        return reply

    async def create(self, name: str, *, required: int = 0, limit: int = 0, secrets=None, **extra):
        request = pb.CreateVolumeRequest(
            name=name,
            parameters=self.params(**extra),
            volume_capabilities=[mount_cap()],
            secrets=secrets or {},
        )
        if required or limit:
            request.capacity_range.required_bytes = required
            request.capacity_range.limit_bytes = limit
        return (await self.call("CreateVolume", request)).volume

    async def delete(self, volume_id: str, secrets=None) -> None:
        await self.call(
            "DeleteVolume", pb.DeleteVolumeRequest(volume_id=volume_id, secrets=secrets or {})
        )

    async def expand(self, volume_id: str, size: int):
        request = pb.ControllerExpandVolumeRequest(
            volume_id=volume_id, capacity_range=pb.CapacityRange(required_bytes=size)
        )
        return await self.call("ControllerExpandVolume", request)

    async def capacity(self, **extra: str) -> int:
        request = pb.GetCapacityRequest(parameters=self.params(**extra))
        return (await self.call("GetCapacity", request)).available_capacity

    def ref(self, name: str, subpath: str | None = None, fs_path: str = "/", policy="delete"):
        return VolumeRef(
            self.address, fs_path, subpath or name, policy, name_digest(name), self.slot
        )


def mount_cap() -> pb.VolumeCapability:
    return pb.VolumeCapability(
        mount=pb.VolumeCapability.MountVolume(),
        access_mode=pb.VolumeCapability.AccessMode(
            mode=pb.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
        ),
    )


async def expect(code: Status, call, match: str = "") -> str:
    with pytest.raises(GRPCError) as err:
        await call
    assert err.value.status is code, err.value.message
    assert re.search(match, err.value.message or ""), err.value.message
    assert "\n" not in (err.value.message or ""), "one line"
    return err.value.message


async def start(nursery, slot: str, **tree_options) -> Harness:
    registry = FakeRegistry(**tree_options)
    pool = NamespacePool(timeout=1.0, open_namespace=registry.open_namespace)
    await nursery.start(pool.run)
    service = ControllerService(
        pool,
        None,  # no Kubernetes API: these tests use no labels or annotations
        default_secrets={"embedded": {"token": "default-token"}},
        call_timeout=0.3,
        registry=registry,
    )
    return Harness(registry, service, slot)


@pytest.fixture(params=sorted(SLOTS))
async def fake(request, nursery) -> Harness:
    return await start(nursery, request.param)


async def test_create_tags_sizes_and_names_the_engine(fake):
    volume = await fake.create("pvc-1")
    assert volume.capacity_bytes == GiB
    expected = fake.ref("pvc-1").volume_id()
    assert volume.volume_id == expected
    version = "2" if fake.slot == "embedded" else f"3;{fake.slot}"
    assert volume.volume_id.startswith(f"{version};d;{name_digest('pvc-1')};{fake.address};")
    assert volume.volume_context["engine"] == fake.slot
    assert (volume.volume_context["fs-path"], volume.volume_context["subpath"]) == ("/", "pvc-1")
    if fake.slot == "seaweedfs":  # the engine's own parameters travel to the node
        assert volume.volume_context["filer"] == "filer-1:8888"
    entry = fake.tree.entries["/pvc-1"]
    assert entry.tags == {TAG_VOLUME: expected.encode(), TAG_OWNER: b"pvc-1"}
    assert (entry.quota, entry.mode) == (GiB, 0o777)


# (first create, second create, expected: capacity or the CSI code)
SIZES = [
    ({}, {}, GiB),
    ({"required": 2 * GiB}, {"required": 2 * GiB}, 2 * GiB),
    ({"required": 2 * GiB}, {"required": GiB, "limit": 3 * GiB}, 2 * GiB),
    ({"required": 2 * GiB}, {"required": 3 * GiB}, Status.ALREADY_EXISTS),
    ({"required": 2 * GiB}, {"limit": GiB}, Status.ALREADY_EXISTS),
    ({"limit": 3 * GiB}, {}, 3 * GiB),  # no range: whatever the volume has
]


@pytest.mark.parametrize(("first", "second", "expected"), SIZES)
async def test_create_is_idempotent_and_refuses_another_size(fake, first, second, expected):
    made = await fake.create("pvc-1", **first)
    before = fake.tree.snapshot()
    if isinstance(expected, Status):
        await expect(expected, fake.create("pvc-1", **second), "incompatible")
    else:
        again = await fake.create("pvc-1", **second)
        assert (again.volume_id, again.capacity_bytes) == (made.volume_id, expected)
    assert fake.tree.snapshot() == before


async def test_concurrent_creates_make_one_directory(fake):
    ids = []

    async def one() -> None:
        ids.append((await fake.create("pvc-1")).volume_id)

    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(one)
    assert len(ids) == 10 and len(set(ids)) == 1 and fake.tree.names("/") == ["pvc-1"]


# (policy, what is left at / afterwards)
POLICIES = [("delete", []), ("archive", ["vol.archived-"]), ("retain", ["vol"])]


@pytest.mark.parametrize(("policy", "left"), POLICIES)
async def test_delete_policies(fake, policy, left):
    volume = await fake.create("vol", **{"on-delete": policy, "path-pattern": "ns/a/vol"})
    fake.tree.add_file("/ns/a/vol/data")
    await fake.delete(volume.volume_id)
    if policy == "delete":  # the parents the path-pattern made go with their last volume
        assert fake.tree.names("/") == []
    else:
        names = fake.tree.names("/ns/a")
        assert len(names) == 1 and names[0].startswith(left[0])
        assert fake.tree.names(f"/ns/a/{names[0]}") == ["data"]
        assert fake.tree.entries["/ns/a"].tags == {TAG_PARENT: b"/"}
    if policy == "retain":  # released: the volume tag stays, the owner goes
        assert fake.tree.entries["/ns/a/vol"].tags == {TAG_VOLUME: volume.volume_id.encode()}
        # a later claim on the same path adopts it, data and all
        again = await fake.create("vol-2", **{"on-delete": "retain", "path-pattern": "ns/a/vol"})
        tags = fake.tree.entries["/ns/a/vol"].tags
        assert tags == {TAG_VOLUME: again.volume_id.encode(), TAG_OWNER: b"vol-2"}
        assert fake.tree.names("/ns/a/vol") == ["data"]
    await fake.delete(volume.volume_id)  # again: already done, nothing changes


async def test_an_empty_parent_not_made_by_fusecsi_stays(fake):
    fake.tree.add_dir("/ns")  # the user's
    volume = await fake.create("vol", **{"path-pattern": "ns/a/vol"})
    fake.tree.add_dir("/ns/a/other")  # not empty once the volume is gone
    await fake.delete(volume.volume_id)
    assert fake.tree.names("/ns/a") == ["other"] and "/ns" in fake.tree.entries


def _foreign_id(fake: Harness) -> bytes:
    return fake.ref("someone-else").volume_id().encode()


# (what is at the volume's path, CSI answer of DeleteVolume; OK means: nothing of ours there)
NOT_OURS = [
    ("untagged directory", lambda t, f: t.add_dir("/vol"), Status.FAILED_PRECONDITION),
    ("a file", lambda t, f: t.add_file("/vol"), Status.FAILED_PRECONDITION),
    (
        "a tag that is no volume id",
        lambda t, f: t.add_dir("/vol", {TAG_VOLUME: b"garbage"}),
        Status.FAILED_PRECONDITION,
    ),
    ("another volume's", lambda t, f: t.add_dir("/vol", {TAG_VOLUME: _foreign_id(f)}), Status.OK),
    ("nothing", lambda t, f: None, Status.OK),
]


@pytest.mark.parametrize("policy", ["delete", "archive", "retain"])
@pytest.mark.parametrize(("what", "make", "code"), NOT_OURS, ids=[n[0] for n in NOT_OURS])
async def test_delete_never_touches_what_is_not_that_volume(fake, policy, what, make, code):
    make(fake.tree, fake)
    fake.tree.add_dir("/keep", {})  # a neighbour
    before = fake.tree.snapshot()
    volume_id = fake.ref("vol", policy=policy).volume_id()
    if code is Status.OK:
        await fake.delete(volume_id)
    else:
        await expect(
            code, fake.delete(volume_id), f"refusing to {policy} /vol: .*nothing was changed"
        )
    assert fake.tree.snapshot() == before


async def test_create_refuses_what_it_did_not_make(fake):
    fake.tree.add_dir("/vol")
    await expect(Status.ALREADY_EXISTS, fake.create("vol"), "not created by fusecsi")
    fake.tree.add_dir("/other", {TAG_VOLUME: _foreign_id(fake), TAG_OWNER: b"someone-else"})
    await expect(Status.ALREADY_EXISTS, fake.create("other"), "in use by volume 'someone-else'")
    fake.tree.add_file("/file")
    await expect(Status.ALREADY_EXISTS, fake.create("file"), "not a directory")


async def test_volumes_never_nest(fake):
    outer = await fake.create("outer", **{"path-pattern": "outer"})
    await expect(
        Status.FAILED_PRECONDITION,
        fake.create("inner", **{"path-pattern": "outer/inner"}),
        "would be inside volume .* at /outer",
    )
    # one made inside by hand (a tag copied in): the outer one is never deleted with it
    fake.tree.add_dir("/outer/deep/inner", {TAG_VOLUME: _foreign_id(fake)})
    before = fake.tree.snapshot()
    await expect(
        Status.FAILED_PRECONDITION,
        fake.delete(outer.volume_id),
        "volume /outer/deep/inner is inside it",
    )
    assert fake.tree.snapshot() == before


async def test_expand(fake):
    volume = await fake.create("vol")
    reply = await fake.expand(volume.volume_id, 3 * GiB)
    assert reply.capacity_bytes == 3 * GiB and not reply.node_expansion_required
    assert fake.tree.entries["/vol"].quota == 3 * GiB
    await fake.expand(volume.volume_id, 3 * GiB)  # the same again
    await expect(Status.INVALID_ARGUMENT, fake.expand(volume.volume_id, GiB), "cannot shrink")
    await expect(
        Status.NOT_FOUND, fake.expand(fake.ref("missing").volume_id(), GiB), "does not exist"
    )
    await expect(Status.NOT_FOUND, fake.expand("not-an-id", GiB), "no such volume")


async def test_capacity(fake):
    assert await fake.capacity() == 100 * GiB
    fake.tree.add_dir("/capped")
    fake.tree.entries["/capped"].quota = 5 * GiB
    fake.tree.add_file("/capped/f", GiB)
    assert await fake.capacity(**{"fs-path": "/capped"}) == 4 * GiB
    assert await fake.capacity(**{"fs-path": "/capped/below"}) == 4 * GiB
    # no cluster named: 0, as the spec allows
    reply = await fake.service.GetCapacity(pb.GetCapacityRequest())
    assert reply.available_capacity == 0


@pytest.mark.parametrize("slot", sorted(SLOTS))
async def test_quotas_recorded_but_not_enforced(nursery, slot):
    fake = await start(nursery, slot, quota_enforced=False)
    volume = await fake.create("vol", required=2 * GiB)
    assert volume.capacity_bytes == 2 * GiB
    assert fake.tree.entries["/vol"].quota == 2 * GiB  # recorded, for expand and stats
    await fake.expand(volume.volume_id, 4 * GiB)
    assert fake.tree.entries["/vol"].quota == 4 * GiB
    fake.tree.entries["/"].quota = GiB  # bounds nothing on such an engine
    assert await fake.capacity() == 100 * GiB
    await fake.delete(volume.volume_id)
    assert fake.tree.names("/") == []


@pytest.mark.parametrize("slot", sorted(SLOTS))
@pytest.mark.parametrize("steps", [0, 1, 2])
async def test_a_non_atomic_mkdir_tagged_stopped_half_way(nursery, slot, steps):
    """Steps: 0 mkdir, 1 volume tag, 2 owner tag, (3 quota). Stopped after the volume tag the
    directory is ours and the retry finishes it; stopped before, it is nobody's: never
    adopted, never deleted."""
    fake = await start(nursery, slot, atomic=False)
    fake.tree.stop_after_steps = steps
    await expect(Status.INTERNAL, fake.create("vol"), "EIO")
    volume_id = fake.ref("vol").volume_id()
    if steps == 0:
        before = fake.tree.snapshot()
        await expect(Status.ALREADY_EXISTS, fake.create("vol"), "not created by fusecsi")
        await expect(Status.FAILED_PRECONDITION, fake.delete(volume_id), "carries no fusecsi tag")
        assert fake.tree.snapshot() == before
        return
    volume = await fake.create("vol")
    assert volume.volume_id == volume_id and volume.capacity_bytes == GiB
    entry = fake.tree.entries["/vol"]
    assert entry.tags == {TAG_VOLUME: volume_id.encode(), TAG_OWNER: b"vol"}
    assert entry.quota == GiB
    await fake.delete(volume_id)
    assert fake.tree.names("/") == []


@pytest.mark.parametrize("slot", sorted(SLOTS))
async def test_a_non_atomic_engine_passes_the_whole_cycle(nursery, slot):
    fake = await start(nursery, slot, atomic=False)
    volume = await fake.create("vol", **{"path-pattern": "ns/vol"})
    assert fake.tree.entries["/ns"].tags == {TAG_PARENT: b"/"}
    await fake.expand(volume.volume_id, 2 * GiB)
    await fake.delete(volume.volume_id)
    assert fake.tree.names("/") == []


def _requests(fake: Harness) -> list[tuple[str, object]]:
    volume_id = fake.ref("vol").volume_id()
    return [
        (
            "CreateVolume",
            pb.CreateVolumeRequest(
                name="vol", parameters=fake.params(), volume_capabilities=[mount_cap()]
            ),
        ),
        ("DeleteVolume", pb.DeleteVolumeRequest(volume_id=volume_id)),
        (
            "ControllerExpandVolume",
            pb.ControllerExpandVolumeRequest(
                volume_id=volume_id, capacity_range=pb.CapacityRange(required_bytes=GiB)
            ),
        ),
        (
            "ValidateVolumeCapabilities",
            pb.ValidateVolumeCapabilitiesRequest(
                volume_id=volume_id, volume_capabilities=[mount_cap()]
            ),
        ),
        ("GetCapacity", pb.GetCapacityRequest(parameters=fake.params())),
    ]


@pytest.mark.parametrize("how", ["unreachable", "hang"])
async def test_a_cluster_that_does_not_answer_is_unavailable(fake, how):
    volume = await fake.create("vol")
    setattr(fake.tree, how, True)
    before = fake.tree.snapshot()
    for method, request in _requests(fake):
        with trio.fail_after(5):
            await expect(
                Status.UNAVAILABLE,
                getattr(fake.service, method)(request),
                "no server of .* answered|did not answer in time",
            )
    assert fake.tree.snapshot() == before
    setattr(fake.tree, how, False)
    await fake.delete(volume.volume_id)  # never "already gone" meanwhile: it is still there
    assert fake.tree.names("/") == []


async def test_a_namespace_that_cannot_open_is_unavailable_and_tried_again(fake):
    fake.tree.open_fails = Unreachable("the engine's mount did not come up")
    await expect(Status.UNAVAILABLE, fake.create("vol"), "mount did not come up")
    fake.tree.open_fails = None
    await fake.create("vol")
    assert fake.tree.names("/") == ["vol"]


async def test_ids_issued_before_keep_working(nursery):
    """Version 2 and version 1 ids (the embedded engine's, as issued today) are found,
    expanded and released."""
    fake = await start(nursery, "embedded")
    v2 = f"2;d;{name_digest('pvc-a')};m1:7000;/k8s;pvc-a"
    v1 = "1;a;m1:7000;/k8s;pvc-b"
    for volume_id, name in [(v2, "pvc-a"), (v1, "pvc-b")]:
        fake.tree.add_dir(f"/k8s/{name}", {TAG_VOLUME: volume_id.encode(), TAG_OWNER: b"x"})
        fake.tree.entries[f"/k8s/{name}"].quota = GiB
        await fake.expand(volume_id, 2 * GiB)
        assert fake.tree.entries[f"/k8s/{name}"].quota == 2 * GiB
        await fake.delete(volume_id)
    assert fake.tree.names("/k8s")[0].startswith("pvc-b.archived-")
    assert len(fake.tree.names("/k8s")) == 1


async def test_secrets_reach_the_engine_and_nothing_else(fake, caplog):
    caplog.set_level(logging.DEBUG)
    volume = await fake.create("vol", secrets={"token": SECRET})
    assert fake.tree.opened_with == [{"token": SECRET}]
    assert SECRET not in volume.volume_id and SECRET not in str(dict(volume.volume_context))
    # GetCapacity carries no secrets: it uses the ones that worked
    assert await fake.capacity() == 100 * GiB
    assert fake.tree.opened_with == [{"token": SECRET}]
    # another secret is another connection
    await fake.delete(volume.volume_id, secrets={"token": "other"})
    assert fake.tree.opened_with == [{"token": SECRET}, {"token": "other"}]
    assert SECRET not in caplog.text


async def test_requests_without_secrets_use_the_defaults(nursery):
    fake = await start(nursery, "embedded")
    await fake.create("vol")
    assert fake.tree.opened_with == [{"token": "default-token"}]


@pytest.mark.parametrize(
    ("parameters", "match"),
    [
        ({"engine": "ceph"}, r"^parameter engine='ceph': unknown engine \(known: embedded, "),
        ({"engine": "curvine"}, r"^engine 'curvine' is not available in this build of fusecsi$"),
        ({"engine": "seaweedfs"}, "parameter filer is required"),
        ({"engine": "seaweedfs", "filer": "f:1", "bogus": "1"}, "mount option 'bogus' is not"),
        ({"master-addrs": "m:1", "bogus": "1"}, "unknown parameter 'bogus'"),
    ],
)
async def test_engine_parameter_errors_are_one_line(nursery, parameters, match):
    fake = await start(nursery, "embedded")
    request = pb.CreateVolumeRequest(
        name="vol", parameters=parameters, volume_capabilities=[mount_cap()]
    )
    await expect(Status.INVALID_ARGUMENT, fake.service.CreateVolume(request), match)


# (method failing, its errno, the CSI code)
ERRNOS = [
    ("mkdir_tagged", errno.EACCES, Status.PERMISSION_DENIED),
    ("mkdir_tagged", errno.ENOSPC, Status.RESOURCE_EXHAUSTED),
    ("mkdir_tagged", errno.EDQUOT, Status.RESOURCE_EXHAUSTED),
    ("mkdir_tagged", errno.EIO, Status.INTERNAL),
    ("mkdir_tagged", errno.ECONNRESET, Status.UNAVAILABLE),
    ("mkdir_tagged", errno.ENAMETOOLONG, Status.INVALID_ARGUMENT),
    ("lookup", errno.EPERM, Status.PERMISSION_DENIED),
]


@pytest.mark.parametrize(("method", "code", "status"), ERRNOS)
async def test_errnos_of_an_engine_become_csi_codes(fake, method, code, status):
    """An engine's OSErrors map as the embedded cluster's do (test_controller_faults.py
    drives them through the real master); nothing is changed, and the retry completes."""
    fake.tree.add_dir("/above")
    fake.tree.refuse[method] = code
    before = fake.tree.snapshot()
    message = await expect(status, fake.create("vol", **{"fs-path": "/above"}))
    assert errno.errorcode[code] in message
    assert fake.tree.snapshot() == before
    await fake.create("vol", **{"fs-path": "/above"})
