"""The CSI controller: a real `fusecsi controller` process creating, deleting and expanding
volume directories on a real cluster (master + worker on loopback), called over its unix
socket exactly as external-provisioner and external-resizer would.

csi-sanity (a Go binary) cannot run here; the controller cases it checks are mirrored below
and named in comments ("sanity: ...").
"""

from __future__ import annotations

import errno
import re
import signal
import stat
import time
import urllib.request

import pytest
import trio
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from support.controller import (
    GiB,
    cluster,
    controller,
    create_request,
    csi,
    kube_api,
    module_spawn,
    mount_cap,
    open_client,
    start_controller,
    unique,
)
from support.processes import read_log

from fusecsi import mount_options
from fusecsi.cluster.client import ClusterError
from fusecsi.cluster.local import LocalCluster, free_port
from fusecsi.csi import bridge as grpc_bridge
from fusecsi.csi.generated import csi_pb2 as pb
from fusecsi.csi.volumes import PV_NAME, PVC_NAME, PVC_NAMESPACE, name_digest

__all__ = ["cluster", "controller", "csi", "kube_api", "module_spawn"]  # fixtures

Mode = pb.VolumeCapability.AccessMode.Mode
VOLUME_TAG = b"trusted.fusecsi.volume"
OWNER_TAG = b"trusted.fusecsi.owner"
PARENT_TAG = b"trusted.fusecsi.parent"


def params(cluster, **extra) -> dict:
    return {"master-addrs": cluster.master_addrs, **extra}


async def expect(code: Status, call, match: str = ""):
    with pytest.raises(GRPCError) as err:
        await call
    assert err.value.status is code, err.value.message
    assert re.search(match, err.value.message or ""), err.value.message
    return err.value


async def names_in(client, path: str) -> list[bytes]:
    ino = (await client.resolve(path)).ino
    return sorted(name for name, _, _ in await client.readdir(ino))


async def test_capabilities_and_capacity(csi, cluster):
    caps = await csi("ControllerGetCapabilities", pb.ControllerGetCapabilitiesRequest())
    Rpc = pb.ControllerServiceCapability.RPC
    assert {c.rpc.type for c in caps.capabilities} == {
        Rpc.CREATE_DELETE_VOLUME,
        Rpc.EXPAND_VOLUME,
        Rpc.GET_CAPACITY,
        Rpc.SINGLE_NODE_MULTI_WRITER,
    }
    # sanity: GetCapacity with no optional values succeeds (0: no cluster named)
    assert (await csi("GetCapacity", pb.GetCapacityRequest())).available_capacity == 0
    got = await csi("GetCapacity", pb.GetCapacityRequest(parameters=params(cluster)))
    async with open_client(cluster.master_addrs) as client:
        free = (await client.statfs())["free_bytes"]
        assert 0 < got.available_capacity and abs(got.available_capacity - free) < 64 << 20
        # a quota on fs-path bounds what volumes below it can get
        base = unique("/capped")
        await client.set_quota((await client.mkdirs(base)).ino, 5 * GiB, None)
    capped = await csi(
        "GetCapacity", pb.GetCapacityRequest(parameters=params(cluster, **{"fs-path": base}))
    )
    assert capped.available_capacity == min(5 * GiB, free)
    block = pb.VolumeCapability(block=pb.VolumeCapability.BlockVolume())
    request = pb.GetCapacityRequest(parameters=params(cluster), volume_capabilities=[block])
    assert (await csi("GetCapacity", request)).available_capacity == 0
    bad = pb.GetCapacityRequest(parameters=params(cluster, bogus="1"))
    await expect(Status.INVALID_ARGUMENT, csi("GetCapacity", bad), "bogus")


async def test_create_with_defaults_tags_and_sizes_the_directory(csi, cluster):
    name = unique("pvc")
    reply = await csi("CreateVolume", create_request(name, params(cluster)))
    volume = reply.volume
    # sanity: no capacity -> a documented default
    assert volume.capacity_bytes == GiB
    assert volume.volume_id == f"2;d;{name_digest(name)};{cluster.master_addrs};/;{name}"
    assert dict(volume.volume_context) == {
        "engine": "embedded",
        "master-addrs": cluster.master_addrs,
        "fs-path": "/",
        "subpath": name,
        "options": mount_options.DEFAULTS.to_arg(),
    }
    async with open_client(cluster.master_addrs) as client:
        attr = await client.resolve(f"/{name}")
        assert stat.S_ISDIR(attr.mode) and stat.S_IMODE(attr.mode) == 0o777
        assert await client.getxattr(attr.ino, VOLUME_TAG) == volume.volume_id.encode()
        assert await client.getxattr(attr.ino, OWNER_TAG) == name.encode()
        quota = await client.get_quota(attr.ino)
        assert (quota.ino, quota.max_bytes) == (attr.ino, GiB)
        # no temporary directories left behind
        assert not [n for n in await names_in(client, "/") if n.startswith(b".fusecsi")]


async def test_capacity_range_rules(csi, cluster):
    for required, limit, expected in [(5 * GiB, 0, 5 * GiB), (0, 3 * GiB, 3 * GiB), (2, 9, 2)]:
        request = create_request(unique("cap"), params(cluster), required=required, limit=limit)
        assert (await csi("CreateVolume", request)).volume.capacity_bytes == expected
    request = create_request(unique("cap"), params(cluster), required=10, limit=5)
    await expect(Status.INVALID_ARGUMENT, csi("CreateVolume", request), "exceeds")
    request = create_request(unique("cap"), params(cluster), required=-1)
    await expect(Status.INVALID_ARGUMENT, csi("CreateVolume", request), "negative")
    # a PVC of 8Ei: no 8 EiB quota, a clear refusal
    request = create_request(unique("cap"), params(cluster), required=2**63 - 1)
    await expect(
        Status.OUT_OF_RANGE,
        csi("CreateVolume", request),
        f"required_bytes {2**63 - 1} is more than a volume can have \\(at most {1 << 60} bytes",
    )


async def test_create_is_idempotent_and_refuses_another_capacity(csi, cluster):
    # sanity: already existing name and same capacity / different capacity
    name = unique("twice")
    first = create_request(name, params(cluster), required=GiB, limit=GiB)
    one = await csi("CreateVolume", first)
    assert await csi("CreateVolume", first) == one
    # a retry without a range accepts the volume as it is
    assert (await csi("CreateVolume", create_request(name, params(cluster)))).volume == one.volume
    bigger = create_request(name, params(cluster), required=2 * GiB, limit=2 * GiB)
    await expect(Status.ALREADY_EXISTS, csi("CreateVolume", bigger), "incompatible")
    # a volume whose quota went missing gets it back from the retry
    async with open_client(cluster.master_addrs) as client:
        ino = (await client.resolve(f"/{name}")).ino
        await client.set_quota(ino, None, None)
        assert (await csi("CreateVolume", first)) == one
        assert (await client.get_quota(ino)).max_bytes == GiB


async def test_twenty_concurrent_identical_creates(csi, cluster):
    name = unique("burst")
    replies = []

    async def create():
        replies.append(await csi("CreateVolume", create_request(name, params(cluster))))

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(create)
    assert len(replies) == 20 and all(r == replies[0] for r in replies)
    async with open_client(cluster.master_addrs) as client:
        entries = await names_in(client, "/")
        assert name.encode() in entries
        assert not [n for n in entries if n.startswith(b".fusecsi")]


async def test_concurrent_create_and_delete_of_one_volume_stay_consistent(csi, cluster):
    name = unique("race")
    request = create_request(name, params(cluster))
    volume_id = (await csi("CreateVolume", request)).volume.volume_id
    delete = pb.DeleteVolumeRequest(volume_id=volume_id)
    answers = []

    async def one(method, req):
        answers.append(await csi(method, req))

    async with trio.open_nursery() as nursery:
        for i in range(16):
            nursery.start_soon(
                one, "CreateVolume" if i % 2 else "DeleteVolume", request if i % 2 else delete
            )
    assert len(answers) == 16  # every call succeeds, in whatever order they ran
    async with open_client(cluster.master_addrs) as client:
        entries = await names_in(client, "/")
        if name.encode() in entries:  # a create ran last: the whole volume is there
            attr = await client.resolve(f"/{name}")
            assert await client.getxattr(attr.ino, VOLUME_TAG) == volume_id.encode()
            assert await client.getxattr(attr.ino, OWNER_TAG) == name.encode()
            assert (await client.get_quota(attr.ino)).max_bytes == GiB
        else:  # a delete ran last: a create now makes it again, a delete finds it gone
            assert (await csi("CreateVolume", request)).volume.volume_id == volume_id
            await csi("DeleteVolume", delete)
            await csi("DeleteVolume", delete)
            assert name.encode() not in await names_in(client, "/")
        assert not [n for n in entries if n.startswith(b".fusecsi")]


async def test_a_renamed_parent_directory_is_not_followed(csi, cluster):
    """fs-path renamed away and made again between two creates: the second volume lands in
    the new directory at fs-path, never under the renamed one (no inode is remembered)."""
    base = unique("/renamed")
    await csi("CreateVolume", create_request(unique("a"), params(cluster, **{"fs-path": base})))
    async with open_client(cluster.master_addrs) as client:
        top = await client.resolve("/")
        await client.rename(top.ino, base[1:].encode(), top.ino, b"moved" + base[1:].encode(), 0)
        await client.mkdirs(base)
    name = unique("b")
    await csi("CreateVolume", create_request(name, params(cluster, **{"fs-path": base})))
    async with open_client(cluster.master_addrs) as client:
        assert await names_in(client, base) == [name.encode()]
        assert name.encode() not in await names_in(client, "/moved" + base[1:])


async def test_a_replaced_parent_directory_is_found_again(csi, cluster):
    """fs-path removed and made again (or replaced by a file) between two creates: the next
    CreateVolume uses what is at the path now."""
    base = unique("/moving")
    first = await csi(
        "CreateVolume", create_request(unique("a"), params(cluster, **{"fs-path": base}))
    )
    async with open_client(cluster.master_addrs) as client:
        old = await client.resolve(base)
        await client.remove_tree(base)
        again = await client.mkdirs(base)
        assert again.ino != old.ino
    name = unique("b")
    reply = await csi("CreateVolume", create_request(name, params(cluster, **{"fs-path": base})))
    async with open_client(cluster.master_addrs) as client:
        attr = await client.resolve(f"{base}/{name}")
        assert await client.getxattr(attr.ino, VOLUME_TAG) == reply.volume.volume_id.encode()
        assert await names_in(client, base) == [name.encode()]
        assert first.volume.volume_id != reply.volume.volume_id
        # a file where the parent directory was: refused, nothing made
        await client.remove_tree(base)
        top = await client.resolve("/")
        await client.create(top.ino, base[1:].encode(), 0o644, 0, 0)
    request = create_request(unique("c"), params(cluster, **{"fs-path": base}))
    await expect(Status.FAILED_PRECONDITION, csi("CreateVolume", request), "ENOTDIR")


BAD_CREATES = [
    # (what, request changes, message) -- sanity: no name, no capabilities
    ("no name", {"name": ""}, "name missing"),
    ("no capabilities", {"volume_capabilities": []}, "volume_capabilities missing"),
    (
        "block access",
        {"volume_capabilities": [pb.VolumeCapability(block=pb.VolumeCapability.BlockVolume())]},
        "block",
    ),
    (
        "no access type",
        {
            "volume_capabilities": [
                pb.VolumeCapability(access_mode=pb.VolumeCapability.AccessMode(mode=1))
            ]
        },
        "access_type",
    ),
    ("unknown access mode", {"volume_capabilities": [mount_cap(Mode.UNKNOWN)]}, "UNKNOWN"),
    ("no master-addrs", {"parameters": {}}, "master-addrs is required"),
    ("bad master-addrs", {"parameters": {"master-addrs": "m:99999"}}, "port"),
    ("relative fs-path", {"fs-path": "base"}, "absolute"),
    ("fs-path traversal", {"fs-path": "/a/../b"}, r"\.\."),
    ("bad on-delete", {"on-delete": "shred"}, "on-delete"),
    ("unknown parameter", {"colour": "blue"}, "unknown parameter 'colour'"),
    ("bad FUSE option", {"attr-timeout": "forever"}, "attr-timeout"),
    ("unknown placeholder", {"path-pattern": "${pvc.spec.x}"}, "unknown placeholder"),
    ("absolute pattern", {"path-pattern": "/etc"}, "relative"),
    ("traversing pattern", {"path-pattern": "a/../../b"}, r"\.\."),
    ("empty segment", {"path-pattern": "a//b"}, "empty"),
    ("over-long name", {"path-pattern": "x" * 256}, "longer than 255"),
    ("pattern without metadata", {"path-pattern": "${pvc.metadata.name}"}, "extra-create-metadata"),
    ("name with a slash", {"name": "a/b"}, "'/'"),
    ("name '..'", {"name": ".."}, "not allowed"),
    (
        "content source",
        {
            "volume_content_source": pb.VolumeContentSource(
                volume=pb.VolumeContentSource.VolumeSource(volume_id="x")
            )
        },
        "volume_content_source",
    ),
    ("mutable parameters", {"mutable_parameters": {"a": "b"}}, "mutable_parameters"),
    ("volume too long for an id", {"fs-path": "/" + "f" * 120, "path-pattern": "p"}, "128"),
]


@pytest.mark.parametrize(
    ("what", "change", "message"), BAD_CREATES, ids=[b[0] for b in BAD_CREATES]
)
async def test_bad_create_requests_are_invalid_argument(csi, cluster, what, change, message):
    fields = {
        "name": unique("bad"),
        "volume_capabilities": [mount_cap()],
        "parameters": params(cluster),
    }
    for key, value in change.items():
        if key in fields or key in ("volume_content_source", "mutable_parameters"):
            fields[key] = value
        else:
            fields["parameters"][key] = value
    await expect(
        Status.INVALID_ARGUMENT, csi("CreateVolume", pb.CreateVolumeRequest(**fields)), message
    )


async def test_options_reserved_keys_and_nested_fs_path(csi, cluster):
    name, base = unique("opts"), unique("/deep") + "/er/base"
    request = create_request(
        name,
        params(
            cluster,
            **{
                "fs-path": base,
                "attr-timeout": "2.5",
                "writeback-cache": "yes",
                "csi.storage.k8s.io/pvc/name": "claim",
                "csi.storage.k8s.io/pvc/namespace": "ns",
                "csi.storage.k8s.io/pv/name": name,
            },
        ),
    )
    volume = (await csi("CreateVolume", request)).volume
    context = dict(volume.volume_context)
    assert (
        context["options"]
        == mount_options.parse({"attr-timeout": "2.5", "writeback-cache": "yes"}).to_arg()
    )
    assert not any(
        "csi.storage.k8s.io" in k or "csi.storage.k8s.io" in v for k, v in context.items()
    )
    assert (context["fs-path"], context["subpath"]) == (base, name)
    async with open_client(cluster.master_addrs) as client:
        await client.resolve(f"{base}/{name}")  # fs-path was created


async def test_maximum_length_name(csi, cluster):
    # sanity: creating a volume with a maximum-length (128) name
    name = "sanity-maxlen-" + "n" * 114
    volume = (await csi("CreateVolume", create_request(name, params(cluster)))).volume
    assert len(volume.volume_id.encode()) <= 128
    again = (await csi("CreateVolume", create_request(name, params(cluster)))).volume
    assert again.volume_id == volume.volume_id
    other = (await csi("CreateVolume", create_request(name[:-1] + "m", params(cluster)))).volume
    assert other.volume_id != volume.volume_id
    await csi("DeleteVolume", pb.DeleteVolumeRequest(volume_id=volume.volume_id))


async def test_delete_policies(csi, cluster):
    base = unique("/policies")
    ids = {}
    for policy in ("delete", "retain", "archive"):
        request = create_request(
            f"pv-{policy}", params(cluster, **{"fs-path": base, "on-delete": policy})
        )
        ids[policy] = (await csi("CreateVolume", request)).volume.volume_id
    async with open_client(cluster.master_addrs) as client:
        for policy in ids:  # some data in every volume
            ino = (await client.resolve(f"{base}/pv-{policy}")).ino
            f = await client.create(ino, b"data", 0o644, 0, 0)
            await client.write(f.ino, 0, b"precious")
            await client.commit(f.ino, 8)
        for volume_id in ids.values():
            for _ in range(2):  # the second call finds the work done: still success
                await csi("DeleteVolume", pb.DeleteVolumeRequest(volume_id=volume_id))
        entries = [n.decode() for n in await names_in(client, base)]
        assert "pv-delete" not in entries
        assert "pv-retain" in entries
        retained = await client.resolve(f"{base}/pv-retain")
        assert await client.getxattr(retained.ino, VOLUME_TAG) == ids["retain"].encode()
        with pytest.raises(ClusterError) as err:  # released: a later claim may adopt it
            await client.getxattr(retained.ino, OWNER_TAG)
        assert err.value.errno == errno.ENODATA
        archived = [e for e in entries if e.startswith("pv-archive")]
        assert len(archived) == 1 and re.fullmatch(
            r"pv-archive\.archived-\d{8}T\d{6}Z", archived[0]
        )
        for kept in ("pv-retain", archived[0]):
            f = await client.lookup((await client.resolve(f"{base}/{kept}")).ino, b"data")
            assert await client.read(f.ino, 0, 100) == b"precious"
        # a retained directory is adopted by a new volume at the same path, data intact
        request = create_request(
            "pv-retain-2",
            params(
                cluster, **{"fs-path": base, "on-delete": "retain", "path-pattern": "pv-retain"}
            ),
        )
        adopted = (await csi("CreateVolume", request)).volume
        assert adopted.volume_id == ids["retain"].replace(
            name_digest("pv-retain"), name_digest("pv-retain-2")
        )
        assert await client.getxattr(retained.ino, OWNER_TAG) == b"pv-retain-2"
        assert await client.getxattr(retained.ino, VOLUME_TAG) == adopted.volume_id.encode()
        # the old volume's DeleteVolume sent again leaves the new holder alone
        await csi("DeleteVolume", pb.DeleteVolumeRequest(volume_id=ids["retain"]))
        assert await client.getxattr(retained.ino, OWNER_TAG) == b"pv-retain-2"


async def test_delete_never_touches_what_fusecsi_did_not_create(csi, cluster):
    base = unique("/users")
    async with open_client(cluster.master_addrs) as client:
        home = await client.mkdirs(f"{base}/home")
        f = await client.create(home.ino, b"thesis.tex", 0o644, 0, 0)
        await client.write(f.ino, 0, b"years of work")
        await client.commit(f.ino, 13)
        # CreateVolume does not adopt it ...
        request = create_request("home", params(cluster, **{"fs-path": base}))
        await expect(Status.ALREADY_EXISTS, csi("CreateVolume", request), "not created by fusecsi")
        # ... and a volume id pointing at it (however obtained) deletes and archives nothing
        for code in "da":
            forged = f"1;{code};{cluster.master_addrs};{base};home"
            await expect(
                Status.FAILED_PRECONDITION,
                csi("DeleteVolume", pb.DeleteVolumeRequest(volume_id=forged)),
                "it carries no fusecsi tag; nothing was changed$",
            )
        # a directory tagged for another volume is that one's: the volume asked for is gone
        await client.setxattr(home.ino, VOLUME_TAG, b"1;d;elsewhere:1;/;x")
        forged = f"1;d;{cluster.master_addrs};{base};home"
        await csi("DeleteVolume", pb.DeleteVolumeRequest(volume_id=forged))
        await expect(Status.ALREADY_EXISTS, csi("CreateVolume", request), "another volume")
        # ... and a tag that names no volume is refused
        await client.setxattr(home.ino, VOLUME_TAG, b"garbage")
        await expect(
            Status.FAILED_PRECONDITION,
            csi("DeleteVolume", pb.DeleteVolumeRequest(volume_id=forged)),
            "it is tagged 'garbage', not as fusecsi volume ",
        )
        # a file where the volume's directory would be
        await client.create((await client.resolve(base)).ino, b"afile", 0o644, 0, 0)
        file_id = f"1;d;{cluster.master_addrs};{base};afile"
        await expect(
            Status.FAILED_PRECONDITION,
            csi("DeleteVolume", pb.DeleteVolumeRequest(volume_id=file_id)),
        )
        file_volume = create_request("afile", params(cluster, **{"fs-path": base}))
        await expect(Status.ALREADY_EXISTS, csi("CreateVolume", file_volume), "not a directory")
        assert sorted(await names_in(client, base)) == [b"afile", b"home"]
        assert await client.read(f.ino, 0, 100) == b"years of work"

        # deleting a nested volume removes its directory and nothing above it but the
        # empty parent fusecsi made for it
        await client.mkdirs(f"{base}/mine")
        for parent in ("ns", "mine"):
            pattern = parent + "/${pv.metadata.name}"
            request = create_request(
                "pv-n", params(cluster, **{"fs-path": base, "path-pattern": pattern})
            )
            volume_id = (await csi("CreateVolume", request)).volume.volume_id
            await csi("DeleteVolume", pb.DeleteVolumeRequest(volume_id=volume_id))
        assert await names_in(client, f"{base}/mine") == []
        assert sorted(await names_in(client, base)) == [b"afile", b"home", b"mine"]
        assert await client.read(f.ino, 0, 100) == b"years of work"


async def test_delete_request_checks(csi, cluster):
    # sanity: no volume id -> INVALID_ARGUMENT; an invalid volume id -> success
    await expect(
        Status.INVALID_ARGUMENT, csi("DeleteVolume", pb.DeleteVolumeRequest()), "volume_id"
    )
    for volume_id in [
        "reallyfakevolumeid",
        "1;d;m:1;/;../etc",
        f"1;d;{cluster.master_addrs};/;never-made",
    ]:
        await csi("DeleteVolume", pb.DeleteVolumeRequest(volume_id=volume_id))


async def test_expand(csi, cluster):
    name = unique("grow")
    volume = (await csi("CreateVolume", create_request(name, params(cluster), required=GiB))).volume

    def expand(required=0, limit=0, volume_id=volume.volume_id, **extra):
        request = pb.ControllerExpandVolumeRequest(volume_id=volume_id, **extra)
        if required or limit:
            request.capacity_range.required_bytes = required
            request.capacity_range.limit_bytes = limit
        return csi("ControllerExpandVolume", request)

    reply = await expand(3 * GiB)
    assert (reply.capacity_bytes, reply.node_expansion_required) == (3 * GiB, False)
    async with open_client(cluster.master_addrs) as client:
        assert (await client.get_quota((await client.resolve(f"/{name}")).ino)).max_bytes == 3 * GiB
    assert (await expand(3 * GiB)).capacity_bytes == 3 * GiB  # same size: nothing to do
    assert (await expand(limit=4 * GiB)).capacity_bytes == 4 * GiB
    await expect(Status.INVALID_ARGUMENT, expand(GiB), "shrink")
    # sanity: no volume id, no capacity range, volume that does not exist
    await expect(Status.INVALID_ARGUMENT, expand(GiB, volume_id=""), "volume_id")
    await expect(Status.INVALID_ARGUMENT, expand(), "capacity_range")
    await expect(Status.NOT_FOUND, expand(GiB, volume_id="not-a-volume"))
    await expect(Status.NOT_FOUND, expand(GiB, volume_id=f"1;d;{cluster.master_addrs};/;gone"))
    block = pb.VolumeCapability(block=pb.VolumeCapability.BlockVolume())
    await expect(Status.INVALID_ARGUMENT, expand(5 * GiB, volume_capability=block), "block")
    # the new size is what a retried CreateVolume without a range reports
    again = await csi("CreateVolume", create_request(name, params(cluster)))
    assert again.volume.capacity_bytes == 4 * GiB


async def test_validate_volume_capabilities(csi, cluster):
    volume = (await csi("CreateVolume", create_request(unique("val"), params(cluster)))).volume

    def validate(caps, volume_id=volume.volume_id, **extra):
        request = pb.ValidateVolumeCapabilitiesRequest(
            volume_id=volume_id, volume_capabilities=caps, **extra
        )
        return csi("ValidateVolumeCapabilities", request)

    every_mode = [mount_cap(m) for m in range(1, 8)]
    reply = await validate(every_mode, volume_context=volume.volume_context)
    assert list(reply.confirmed.volume_capabilities) == every_mode
    assert dict(reply.confirmed.volume_context) == dict(volume.volume_context)
    block = pb.VolumeCapability(block=pb.VolumeCapability.BlockVolume())
    reply = await validate([mount_cap(), block])
    assert not reply.HasField("confirmed") and "block" in reply.message
    reply = await validate([mount_cap()], parameters={"bogus": "1"})
    assert not reply.HasField("confirmed") and "bogus" in reply.message
    # sanity: no volume id, no capabilities, volume that does not exist
    await expect(Status.INVALID_ARGUMENT, validate([mount_cap()], volume_id=""), "volume_id")
    await expect(Status.INVALID_ARGUMENT, validate([]), "volume_capabilities")
    await expect(Status.NOT_FOUND, validate([mount_cap()], volume_id="fake-vol-id-123"))
    missing = f"1;d;{cluster.master_addrs};/;{unique('nope')}"
    await expect(Status.NOT_FOUND, validate([mount_cap()], volume_id=missing))


async def test_path_pattern_from_pvc_labels_and_annotations(csi, cluster, kube_api):
    """The PVC is served by the fake API server (a real kube-apiserver cannot run here)."""
    namespace, claim = unique("team"), "data-web-0"
    kube_api.add_pvc(
        namespace, claim, labels={"app": "web"}, annotations={"example.com/tier": "gold"}
    )
    metadata = {
        "csi.storage.k8s.io/pvc/namespace": namespace,
        "csi.storage.k8s.io/pvc/name": claim,
        "csi.storage.k8s.io/pv/name": "pvc-1234",
    }
    pattern = (
        "${pvc.metadata.namespace}/${pvc.metadata.labels.app}"
        "/${pvc.metadata.annotations.example.com/tier}-${pvc.metadata.name}"
    )
    request = create_request("pvc-1234", params(cluster, **{"path-pattern": pattern, **metadata}))
    volume = (await csi("CreateVolume", request)).volume
    assert volume.volume_context["subpath"] == f"{namespace}/web/gold-{claim}"
    assert f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/{claim}" in kube_api.requests
    async with open_client(cluster.master_addrs) as client:
        await client.resolve(f"/{namespace}/web/gold-{claim}")

    # a label or annotation that would leave fs-path, or is missing, is refused
    kube_api.add_pvc(
        namespace, "evil", labels={"app": "web"}, annotations={"example.com/tier": "../../x"}
    )
    kube_api.add_pvc(namespace, "bare")
    # (FAILED_PRECONDITION: the user fixes the PVC and the provisioner's normal backoff
    # retries, where INVALID_ARGUMENT waits about 5 minutes)
    for name, match in [
        ("evil", r"\.\..*: fix PVC " + namespace + "/evil$"),
        ("bare", "the PVC has no such label: fix PVC " + namespace + "/bare$"),
    ]:
        meta = {**metadata, "csi.storage.k8s.io/pvc/name": name}
        request = create_request(unique("pv"), params(cluster, **{"path-pattern": pattern, **meta}))
        await expect(Status.FAILED_PRECONDITION, csi("CreateVolume", request), match)
    meta = {**metadata, "csi.storage.k8s.io/pvc/name": "absent"}
    request = create_request(unique("pv"), params(cluster, **{"path-pattern": pattern, **meta}))
    await expect(Status.FAILED_PRECONDITION, csi("CreateVolume", request), "not found")

    # two claims mapped onto one directory: the second is refused
    shared = "${pvc.metadata.namespace}/shared"
    first = create_request("pv-a", params(cluster, **{"path-pattern": shared, **metadata}))
    await csi("CreateVolume", first)
    second = create_request("pv-b", params(cluster, **{"path-pattern": shared, **metadata}))
    refused = await expect(
        Status.ALREADY_EXISTS, csi("CreateVolume", second), "in use by volume 'pv-a'"
    )
    # says what a kept (Retain) PV's directory needs, not only the pattern
    assert "reclaimPolicy Retain (move its directory aside: fusecsi fs --master-addrs " in (
        refused.message
    )
    assert "give path-pattern a placeholder that tells volumes apart" in refused.message


async def test_path_pattern_without_a_kubernetes_api(module_spawn, cluster, tmp_path):
    _, sock = start_controller(module_spawn, tmp_path)
    request = create_request(
        "pv-x",
        params(
            cluster,
            **{
                "path-pattern": "${pvc.metadata.labels.app}",
                "csi.storage.k8s.io/pvc/namespace": "ns",
                "csi.storage.k8s.io/pvc/name": "claim",
            },
        ),
    )
    async with grpc_bridge.connect(str(sock)) as call:
        await expect(
            Status.FAILED_PRECONDITION,
            call("Controller", "CreateVolume", request),
            "no Kubernetes API configured",
        )


async def test_cluster_down_is_unavailable_and_loses_nothing(module_spawn, tmp_path):
    """A master that does not answer is UNAVAILABLE for every RPC, never "already deleted";
    once it is back, the volume and its data are all there. With a token: requests carry it
    as the `token` secret, a wrong one is PERMISSION_DENIED, and it never reaches the log."""
    token = "s3cret-" + unique("tok")
    with LocalCluster(tmp_path / "cluster", workers=1, token=token) as down:
        metrics_port = free_port()
        proc, sock = start_controller(
            module_spawn,
            tmp_path,
            "--cluster-timeout",
            "2",
            "--metrics-address",
            f"127.0.0.1:{metrics_port}",
        )
        secrets = {"token": token}
        request = create_request("pv-keep", params(down), secrets=secrets)
        async with grpc_bridge.connect(str(sock)) as call:
            volume = (await call("Controller", "CreateVolume", request)).volume
            async with open_client(down.master_addrs, token) as client:
                ino = (await client.resolve("/pv-keep")).ino
                f = await client.create(ino, b"data", 0o644, 0, 0)
                await client.write(f.ino, 0, b"still here")
                await client.commit(f.ino, 10)

            wrong = create_request("pv-other", params(down), secrets={"token": "wrong"})
            await expect(Status.PERMISSION_DENIED, call("Controller", "CreateVolume", wrong))
            forged = pb.DeleteVolumeRequest(volume_id=volume.volume_id, secrets={"token": "x"})
            await expect(Status.PERMISSION_DENIED, call("Controller", "DeleteVolume", forged))
            async with open_client(down.master_addrs, token) as client:
                assert await names_in(client, "/") == [b"pv-keep"]

            down.kill_master()
            delete = pb.DeleteVolumeRequest(volume_id=volume.volume_id, secrets=secrets)
            expand = pb.ControllerExpandVolumeRequest(
                volume_id=volume.volume_id,
                capacity_range=pb.CapacityRange(required_bytes=2 * GiB),
                secrets=secrets,
            )
            validate = pb.ValidateVolumeCapabilitiesRequest(
                volume_id=volume.volume_id, volume_capabilities=[mount_cap()], secrets=secrets
            )
            capacity = pb.GetCapacityRequest(parameters=params(down))
            for method, req in [
                ("DeleteVolume", delete),
                ("CreateVolume", request),
                ("CreateVolume", create_request("pv-new", params(down), secrets=secrets)),
                ("ControllerExpandVolume", expand),
                ("ValidateVolumeCapabilities", validate),
                ("GetCapacity", capacity),
            ]:
                await expect(Status.UNAVAILABLE, call("Controller", method, req))

            down.restart_master()
            async with open_client(down.master_addrs, token) as client:
                assert await names_in(client, "/") == [b"pv-keep"]
                ino = (await client.resolve("/pv-keep")).ino
                f = await client.lookup(ino, b"data")
                assert await client.read(f.ino, 0, 100) == b"still here"
                assert (await client.get_quota(ino)).max_bytes == GiB
            # GetCapacity has no secrets: it uses the token that last worked for the cluster
            got = await call("Controller", "GetCapacity", capacity)
            assert got.available_capacity > 0
            await call("Controller", "DeleteVolume", delete)
            async with open_client(down.master_addrs, token) as client:
                assert await names_in(client, "/") == []
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        metrics = await trio.to_thread.run_sync(lambda: urllib.request.urlopen(url).read().decode())
        assert (
            'fusecsi_csi_call_seconds_count{code="UNAVAILABLE",method="DeleteVolume"} 1.0'
            in metrics
        )
        assert 'fusecsi_csi_call_seconds_count{code="OK",method="DeleteVolume"} 1.0' in metrics
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
    assert token not in read_log(proc)


async def test_several_master_addresses_fail_over(csi, cluster):
    dead = "127.0.0.1:9"  # nothing listens there: the client moves on to the live master
    request = create_request(
        unique("multi"), params(cluster, **{"master-addrs": f"{cluster.master_addrs},{dead}"})
    )
    volume = (await csi("CreateVolume", request)).volume
    expected = ",".join(sorted([cluster.master_addrs, dead]))
    assert volume.volume_context["master-addrs"] == expected
    assert volume.volume_id.split(";")[3] == expected
    await csi("DeleteVolume", pb.DeleteVolumeRequest(volume_id=volume.volume_id))


def test_archive_names_stay_within_255_bytes():
    from fusecsi.csi.controller.service import archive_name

    assert archive_name("pv", 0) == "pv.archived-19700101T000000Z"
    long = archive_name("é" * 127, 1_795_000_000)
    assert len(long.encode()) <= 255 and long.endswith(".archived-20261118T110640Z")
    assert long.startswith("é")


@pytest.mark.parametrize("policy", ["delete", "archive", "retain"])
async def test_a_reused_pvc_name_never_touches_the_new_volume(csi, cluster, policy):
    """Issue 14 item 9: a PVC deleted and re-created under its name gets the same directory
    from a namespace-name path-pattern; external-provisioner then sends DeleteVolume for the
    old volume again (when it drops its finalizer). That call must leave the new one alone."""
    base, namespace = unique("/reuse"), unique("ns")

    def request(pv: str):
        meta = {PVC_NAMESPACE: namespace, PVC_NAME: "data-web-0", PV_NAME: pv}
        pattern = "${pvc.metadata.namespace}-${pvc.metadata.name}"
        extra = {"fs-path": base, "on-delete": policy, "path-pattern": pattern, **meta}
        return create_request(pv, params(cluster, **extra))

    old = (await csi("CreateVolume", request("pvc-old"))).volume.volume_id
    # re-created before the old volume is deleted: refused until it is
    await expect(Status.ALREADY_EXISTS, csi("CreateVolume", request("pvc-new")), "pvc-old")
    await csi("DeleteVolume", pb.DeleteVolumeRequest(volume_id=old))
    new = (await csi("CreateVolume", request("pvc-new"))).volume.volume_id
    assert new != old
    path = f"{base}/{namespace}-data-web-0"
    async with open_client(cluster.master_addrs) as client:
        ino = (await client.resolve(path)).ino
        f = await client.create(ino, b"new-data", 0o644, 0, 0)
        await client.write(f.ino, 0, b"fresh")
        await client.commit(f.ino, 5)
        before = await names_in(client, base)
        for _ in range(2):
            await csi("DeleteVolume", pb.DeleteVolumeRequest(volume_id=old))
        expand = pb.ControllerExpandVolumeRequest(
            volume_id=old, capacity_range=pb.CapacityRange(required_bytes=5 * GiB)
        )
        await expect(Status.NOT_FOUND, csi("ControllerExpandVolume", expand))
        assert await names_in(client, base) == before
        assert (await client.resolve(path)).ino == ino
        assert await client.getxattr(ino, VOLUME_TAG) == new.encode()
        assert await client.getxattr(ino, OWNER_TAG) == b"pvc-new"
        assert (await client.get_quota(ino)).max_bytes == GiB
        assert await client.read(f.ino, 0, 10) == b"fresh"
        # the new volume's own DeleteVolume applies the policy
        await csi("DeleteVolume", pb.DeleteVolumeRequest(volume_id=new))
        if policy == "retain":
            with pytest.raises(ClusterError) as err:
                await client.getxattr(ino, OWNER_TAG)
            assert err.value.errno == errno.ENODATA
        else:
            assert f"{namespace}-data-web-0".encode() not in await names_in(client, base)


async def test_volumes_never_nest(csi, cluster):
    """Issue 23: deleting or archiving a volume would take a volume inside it along."""
    base = unique("/nest")

    def request(name: str, pattern: str, policy: str = "delete"):
        extra = {"fs-path": base, "path-pattern": pattern, "on-delete": policy}
        return create_request(name, params(cluster, **extra))

    outer = (await csi("CreateVolume", request("pv-outer", "team"))).volume.volume_id
    await expect(
        Status.FAILED_PRECONDITION,
        csi("CreateVolume", request("pv-inner", "team/${pv.metadata.name}")),
        f"inside volume {re.escape(outer)}",
    )
    # the other way round: a volume's ancestor is no volume of its own
    await csi("CreateVolume", request("pv-low", "crew/${pv.metadata.name}"))
    await expect(
        Status.ALREADY_EXISTS, csi("CreateVolume", request("pv-crew", "crew")), "not created by"
    )
    # fs-path of another class inside a volume, two levels below it
    below = create_request("pv-below", params(cluster, **{"fs-path": f"{base}/team/sub"}))
    await expect(Status.FAILED_PRECONDITION, csi("CreateVolume", below), f"at {base}/team;")
    top = unique("top")  # a volume right below the root, and one two levels inside it
    await csi("CreateVolume", create_request(top, params(cluster)))
    inside = create_request("pv-inside", params(cluster, **{"fs-path": f"/{top}/a"}))
    await expect(Status.FAILED_PRECONDITION, csi("CreateVolume", inside), f"at /{top};")
    async with open_client(cluster.master_addrs) as client:
        assert await names_in(client, f"{base}/team") == []
        # volumes an older controller let nest: the outer one's delete or archive is
        # refused, naming the inner one; retain keeps everything and may go ahead
        for policy in ("delete", "archive", "retain"):
            outer = (await csi("CreateVolume", request(f"pv-{policy}", policy, policy))).volume
            home = await client.resolve(f"{base}/{policy}")
            inner = await client.mkdir(home.ino, b"deep", 0o755, 0, 0)
            inner = await client.mkdir(inner.ino, b"inner", 0o755, 0, 0)
            await client.setxattr(inner.ino, VOLUME_TAG, b"1;d;m:1;/;legacy")
            delete = csi("DeleteVolume", pb.DeleteVolumeRequest(volume_id=outer.volume_id))
            if policy == "retain":
                await delete
            else:
                await expect(Status.FAILED_PRECONDITION, delete, f"{policy}/deep/inner is inside")
            assert (await client.resolve(f"{base}/{policy}/deep/inner")).ino == inner.ino
            assert await client.getxattr(home.ino, VOLUME_TAG) == outer.volume_id.encode()


async def test_over_long_volume_ids_name_no_volume(csi, cluster):
    """Issue 23: a well-formed id whose canonical form passes 128 bytes was answered
    INTERNAL by DeleteVolume; no CreateVolume answered it, so the volume does not exist."""
    for volume_id in (
        f"1;d;{cluster.master_addrs};/;" + "v" * 200,
        f"2;d;{name_digest('x')};{cluster.master_addrs};/;" + "v" * 120,
    ):
        await csi("DeleteVolume", pb.DeleteVolumeRequest(volume_id=volume_id))
        expand = pb.ControllerExpandVolumeRequest(
            volume_id=volume_id, capacity_range=pb.CapacityRange(required_bytes=GiB)
        )
        await expect(Status.NOT_FOUND, csi("ControllerExpandVolume", expand))


async def test_archive_names_never_collide(csi, cluster):
    """Archives of one path within a second: each takes the next free name; with every name
    taken the delete is refused and nothing moves."""
    from fusecsi.csi.controller.service import ARCHIVE_ATTEMPTS, archive_name

    base = unique("/archives")
    async with open_client(cluster.master_addrs) as client:
        for directory, free in [("vol", ARCHIVE_ATTEMPTS - 1), ("all", None)]:
            extra = {"fs-path": base, "on-delete": "archive", "path-pattern": directory}
            request = create_request(f"pv-{directory}", params(cluster, **extra))
            volume_id = (await csi("CreateVolume", request)).volume.volume_id
            parent = await client.resolve(base)
            now = time.time()
            taken = {  # every name the archive could take in the next minute, but `free`
                archive_name(directory, now + second, attempt).encode()
                for second in range(-1, 60)
                for attempt in range(ARCHIVE_ATTEMPTS)
                if attempt != free
            }
            for name in taken:
                await client.mkdir(parent.ino, name, 0o755, 0, 0)
            delete = csi("DeleteVolume", pb.DeleteVolumeRequest(volume_id=volume_id))
            left = set(await names_in(client, base)) - taken
            if free is None:
                await expect(Status.FAILED_PRECONDITION, delete, "EEXIST")
                assert directory.encode() in await names_in(client, base)
            else:
                await delete
                [archived] = set(await names_in(client, base)) - taken - left
                pattern = rf"vol\.archived-\d{{8}}T\d{{6}}Z-{free}".encode()
                assert re.fullmatch(pattern, archived), archived


async def test_empty_parents_made_by_a_path_pattern_go_with_the_volume(csi, cluster):
    """Issue 18: `<fs-path>/<namespace>` made for a namespace's first volume is removed with
    its last one, when fusecsi made it and it is empty; nothing else is ever removed."""
    base = unique("/parents")

    def request(namespace: str, name: str, policy: str = "delete"):
        meta = {PVC_NAMESPACE: namespace, PVC_NAME: name}
        pattern = "${pvc.metadata.namespace}/x/${pvc.metadata.name}"
        extra = {"fs-path": base, "on-delete": policy, "path-pattern": pattern, **meta}
        return create_request(unique("pv"), params(cluster, **extra))

    async def create(namespace: str, name: str, policy: str = "delete") -> pb.DeleteVolumeRequest:
        reply = await csi("CreateVolume", request(namespace, name, policy))
        return pb.DeleteVolumeRequest(volume_id=reply.volume.volume_id)

    async with open_client(cluster.master_addrs) as client:
        await client.mkdirs(f"{base}/own")  # a user's directory: used, never removed
        a, b = await create("team", "a"), await create("team", "b")
        for made in ("team", "team/x"):
            attr = await client.resolve(f"{base}/{made}")
            assert await client.getxattr(attr.ino, PARENT_TAG) == base.encode()
        with pytest.raises(ClusterError):
            await client.getxattr((await client.resolve(base)).ino, PARENT_TAG)
        await csi("DeleteVolume", a)
        assert await names_in(client, f"{base}/team/x") == [b"b"]  # b is still in there
        await csi("DeleteVolume", b)
        assert await names_in(client, base) == [b"own"]  # team/x, then team: both empty
        await csi("DeleteVolume", b)  # again: already gone, nothing else touched

        # the user's own directory stays; the one fusecsi made inside it goes
        await csi("DeleteVolume", await create("own", "c"))
        assert await names_in(client, f"{base}/own") == []

        # a file someone left in a parent fusecsi made: the walk stops there, quietly
        busy = await create("busy", "d")
        await client.create((await client.resolve(f"{base}/busy")).ino, b"note", 0o644, 0, 0)
        await csi("DeleteVolume", busy)
        assert await names_in(client, f"{base}/busy") == [b"note"]

        # archive and retain keep a directory in the parent: it stays
        for policy in ("archive", "retain"):
            await csi("DeleteVolume", await create(policy, "e", policy))
            assert len(await names_in(client, f"{base}/{policy}/x")) == 1

        # made again, tagged again, for the namespace's next volume
        again = await create("team", "f")
        attr = await client.resolve(f"{base}/team")
        assert await client.getxattr(attr.ino, PARENT_TAG) == base.encode()
        await csi("DeleteVolume", again)
        assert sorted(await names_in(client, base)) == [b"archive", b"busy", b"own", b"retain"]


async def until(check, what: str, deadline: float = 30.0):
    """`check()` once it is truthy (a condition, polled; the deadline only ends a hang)."""
    end = time.monotonic() + deadline
    while not (found := check()):
        assert time.monotonic() < end, f"{what}: not within {deadline}s"
        await trio.sleep(0.05)
    return found


async def test_on_delete_under_reclaim_policy_retain_is_warned_on_the_pvc(csi, cluster, kube_api):
    """Issue 18: with reclaimPolicy Retain Kubernetes never calls DeleteVolume, so an
    on-delete other than retain never runs: a Warning Event on the PVC says so, once."""
    namespace, base = unique("warn"), unique("/warn")
    kube_api.add_storage_class("kept", "Retain")
    kube_api.add_storage_class("dropped", "Delete")
    kube_api.forbidden.add(namespace + "-locked")

    def request(claim: str, policy: str, ns: str = namespace):
        meta = {PVC_NAMESPACE: ns, PVC_NAME: claim, PV_NAME: "pv-" + claim}
        extra = {"fs-path": base, "on-delete": policy, **meta}
        return create_request("pv-" + claim, params(cluster, **extra))

    for claim, storage_class in [("a", "kept"), ("b", "kept"), ("c", "dropped"), ("d", "kept")]:
        kube_api.add_pvc(namespace, claim, storage_class=storage_class)
    kube_api.add_pvc(namespace, "no-class")
    for claim, policy, ns in [
        ("a", "delete", namespace),
        ("a", "delete", namespace),  # the same CreateVolume again: no second Event
        ("b", "retain", namespace),  # says what happens: nothing to warn about
        ("c", "archive", namespace),  # reclaimPolicy Delete: on-delete runs
        ("no-class", "delete", namespace),
        ("absent", "delete", namespace),  # no such PVC, or one we may not read: the
        ("x", "delete", namespace + "-locked"),  # volume is made all the same
        ("d", "archive", namespace),
    ]:
        volume = (await csi("CreateVolume", request(claim, policy, ns))).volume
        assert volume.volume_context["subpath"] == "pv-" + claim
    [last] = await until(lambda: kube_api.events_about("d"), "the Event on PVC d")
    assert "on-delete: archive never runs" in last["message"]
    # Events are posted in order: every earlier one is in by now
    [warning] = kube_api.events_about("a")
    for claim in ("b", "c", "no-class", "absent", "x"):
        assert kube_api.events_about(claim) == [], claim
    assert "/apis/storage.k8s.io/v1/storageclasses/kept" in kube_api.requests
    assert warning["reason"] == "OnDeleteNeverRuns" and warning["type"] == "Warning"
    assert warning["involvedObject"]["kind"] == "PersistentVolumeClaim"
    assert warning["involvedObject"]["namespace"] == namespace
    assert warning["message"] == (
        "StorageClass kept has reclaimPolicy Retain, so Kubernetes never calls DeleteVolume "
        f"and its on-delete: delete never runs: {base}/pv-a stays, held by the PV, when this "
        "claim is deleted. Set on-delete: retain to say so, or reclaimPolicy: Delete to have "
        "on-delete applied"
    )


async def test_the_retain_check_without_a_kubernetes_api_is_logged(module_spawn, cluster, tmp_path):
    proc, sock = start_controller(module_spawn, tmp_path)
    meta = {PVC_NAMESPACE: "ns", PVC_NAME: "claim", PV_NAME: "pv-unchecked"}
    request = create_request("pv-unchecked", params(cluster, **{"fs-path": "/unchecked", **meta}))
    async with grpc_bridge.connect(str(sock)) as call:
        await call("Controller", "CreateVolume", request)
    line = await until(
        lambda: [
            line
            for line in read_log(proc).splitlines()
            if "no Kubernetes API configured" in line and "reclaimPolicy Retain" in line
        ],
        "the log line",
    )
    assert "on-delete: delete" in line[0]


async def test_create_racing_the_delete_of_the_last_volume_in_a_parent(
    controller, cluster, module_spawn, tmp_path
):
    """Two controllers (no lock shared): one deletes the last volume of a parent (and the
    parent with it) while the other creates a volume in that parent. Both succeed, whatever
    the order: the create makes the parent again when it vanished under it."""
    _, sock = start_controller(module_spawn, tmp_path)
    base = unique("/race-parents")

    def request(name: str):
        extra = {"fs-path": base, "path-pattern": "ns/x/${pv.metadata.name}", PV_NAME: name}
        return create_request(name, params(cluster, **extra))

    async with (
        grpc_bridge.connect_many([str(controller[1]), str(sock)]) as (one, other),
        open_client(cluster.master_addrs) as client,
    ):
        for round_ in range(12):
            reply = await one("Controller", "CreateVolume", request(f"a{round_}"))
            first = reply.volume.volume_id
            made = []

            async def create(round_=round_, made=made) -> None:
                reply = await other("Controller", "CreateVolume", request(f"b{round_}"))
                made.append(reply.volume.volume_id)

            async with trio.open_nursery() as nursery:
                delete = pb.DeleteVolumeRequest(volume_id=first)
                nursery.start_soon(one, "Controller", "DeleteVolume", delete)
                nursery.start_soon(create)
            attr = await client.resolve(f"{base}/ns/x/b{round_}")
            assert await client.getxattr(attr.ino, VOLUME_TAG) == made[0].encode()
            await other("Controller", "DeleteVolume", pb.DeleteVolumeRequest(volume_id=made[0]))
            assert await names_in(client, base) == []
