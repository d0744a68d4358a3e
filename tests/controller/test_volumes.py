"""fusecsi/csi/volumes.py: volume ids, parameters, path-pattern expansion and path safety."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fusecsi import mount_options
from fusecsi.csi.volumes import (
    MAX_FS_PATH_BYTES,
    MAX_VOLUME_ID,
    PV_NAME,
    PVC_NAME,
    PVC_NAMESPACE,
    PathPattern,
    VolumeRef,
    default_subpath,
    name_digest,
    normalize_fs_path,
    normalize_master_addrs,
    parse_parameters,
    validate_subpath,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("m1:9000", "m1:9000"),
        ("M1.Example.COM", "m1.example.com:8995"),
        (" b:1 , a:2,b:1", "a:2,b:1"),
        ("10.0.0.2:8995,10.0.0.1", "10.0.0.1:8995,10.0.0.2:8995"),
        ("[::1]:7000,[0:0::1]", "[::1]:7000,[::1]:8995"),
    ],
)
def test_master_addrs_normalised(text, expected):
    assert normalize_master_addrs(text) == expected


def test_master_addrs_limits():
    assert normalize_master_addrs("a:65535") == "a:65535"
    assert normalize_master_addrs("a:1") == "a:1"
    host = ".".join(["h" * 63] * 3 + ["h" * 61])  # 253 bytes, the longest host name
    assert normalize_master_addrs(host) == f"{host}:8995"
    with pytest.raises(ValueError, match="not a host name"):
        normalize_master_addrs(host + "h")
    with pytest.raises(ValueError, match="not a host name"):
        normalize_master_addrs("h" * 64)  # a label is at most 63 bytes


@pytest.mark.parametrize(
    "text",
    ["", " ", "a:0", "a:65536", "a:x", "a,,b", "a b:1", "::1", "[::1", "[zz]:1", "-a:1", "a_b"],
)
def test_bad_master_addrs(text):
    with pytest.raises(ValueError, match="master"):
        normalize_master_addrs(text)


def test_fs_path_rules():
    assert normalize_fs_path("/") == "/"
    assert normalize_fs_path("/a/b/") == "/a/b"
    for bad in ["", "a", "/a//b", "/a/../b", "/./a", "//", "/a\x00b", "/" + "x" * 256]:
        with pytest.raises(ValueError, match="fs-path"):
            normalize_fs_path(bad)
    longest = "/" + "/".join(["x" * 255] * 16)  # 16 names of 255 bytes: 4096 bytes
    assert len(longest.encode()) == MAX_FS_PATH_BYTES
    assert normalize_fs_path(longest) == longest
    with pytest.raises(ValueError, match="longer than 4096"):
        normalize_fs_path(longest[:-2] + "/xx")


@pytest.mark.parametrize(
    "text",
    ["", "/abs", "a/../b", "..", ".", "a//b", "a/", "a/./b", "x" * 256, "/".join("a" * 9), "a\nb"],
)
def test_subpath_traversal_and_shape_refused(text):
    with pytest.raises(ValueError, match="subpath"):
        validate_subpath(text)


def test_subpath_accepts_eight_segments_and_255_byte_names():
    assert validate_subpath("/".join("abcdefgh"))
    assert validate_subpath("é" * 127 + "x")  # 255 bytes
    with pytest.raises(ValueError, match="256 bytes is longer than 255"):
        validate_subpath("é" * 128)


@pytest.mark.parametrize(
    ("text", "message"),
    [("a\x7fb", "control characters"), ("a\x1fb", "control characters"), ("a\udcffb", "UTF-8")],
)
def test_subpath_characters_refused(text, message):
    with pytest.raises(ValueError, match=message):
        validate_subpath(text)
    assert validate_subpath("a\x80b~ é")  # C1 and other printable characters are names


def test_volume_id_round_trip_and_escaping():
    ref = VolumeRef("B:1,a:2", "/base;x%", "ns;1/pvc%41", "archive", name_digest("pvc-1"))
    vid = ref.volume_id()
    assert vid == f"2;a;{name_digest('pvc-1')};a:2,b:1;/base%3Bx%25;ns%3B1/pvc%2541"
    back = VolumeRef.from_volume_id(vid)
    assert back == ref and back.path == "/base;x%/ns;1/pvc%41"
    # version 1 ids (no name digest) still parse and name the same directory
    old = VolumeRef.from_volume_id("1;a;a:2,b:1;/base%3Bx%25;ns%3B1/pvc%2541")
    assert old.name_digest == "" and old.path == back.path and old.same_but_digest(back)
    assert old.volume_id() == "1;a;a:2,b:1;/base%3Bx%25;ns%3B1/pvc%2541"
    assert not old.same_but_digest(VolumeRef("a:2,b:1", "/base;x%", "ns;1/pvc%41", "retain"))
    assert (back.parent_path, back.name) == ("/base;x%/ns;1", "pvc%41")
    assert VolumeRef("m:1", "/", "v").path == "/v"
    assert VolumeRef("m:1", "/", "v").parent_path == "/"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "reallyfakevolumeid",
        "2;d;m:1;/;v",
        "2;d;;m:1;/;v",
        "2;d;0123456g;m:1;/;v",
        "2;d;0123456;m:1;/;v",
        "2;d;01234567;m:1;/;v;x",
        "3;d;01234567;m:1;/;v",
        "1;d;m:1;/;" + "v" * 119,  # 129 bytes: no CreateVolume answered it
        "1;d;m;/;" + "v" * 120,  # 128 bytes, but 133 with the default port filled in
        "1;x;m:1;/;v",
        "1;d;m:1;/;v;extra",
        "1;d;m:1;/;../v",
        "1;d;m:1;/;/v",
        "1;d;m:1;relative;v",
        "1;d;m:1;/;v%",
        "1;d;m:1;/;v%2F..",
        "1;d;;/;v",
        "1;d;m:1;/a/..;v",
    ],
)
def test_volume_ids_that_do_not_parse(text):
    with pytest.raises(ValueError, match="volume id|more than 128|subpath|fs-path|master|digest"):
        VolumeRef.from_volume_id(text)


def test_volume_id_limit():
    base = "1;d;m:1;/;"
    fits = VolumeRef("m:1", "/", "v" * (MAX_VOLUME_ID - len(base)))
    assert len(fits.volume_id()) == MAX_VOLUME_ID
    with pytest.raises(ValueError, match="more than 128"):
        VolumeRef("m:1", "/", "v" * (MAX_VOLUME_ID - len(base) + 1)).volume_id()
    # escaping counts: one ';' costs three bytes
    with pytest.raises(ValueError, match="more than 128"):
        VolumeRef("m:1", "/", ";" * 40).volume_id()
    digest = name_digest("x")
    fits = VolumeRef("m:1", "/", "v" * (MAX_VOLUME_ID - len(base) - 9), name_digest=digest)
    assert len(fits.volume_id()) == MAX_VOLUME_ID
    assert VolumeRef.from_volume_id(fits.volume_id()) == fits


names = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/"),
    min_size=1,
    max_size=60,
).filter(lambda s: s not in (".", ".."))


@given(
    addrs=st.lists(st.sampled_from(["a:1", "B.c:22", "10.1.2.3", "[::2]:9"]), min_size=1),
    fs=st.lists(names, max_size=3),
    sub=st.lists(names, min_size=1, max_size=3),
    policy=st.sampled_from(["delete", "retain", "archive"]),
    digest=st.sampled_from(["", name_digest("pvc-1")]),
)
def test_volume_id_round_trip_property(addrs, fs, sub, policy, digest):
    ref = VolumeRef(",".join(addrs), "/" + "/".join(fs), "/".join(sub), policy, digest)
    escaped = sum(2 * (ch in "%;") + len(ch.encode()) for ch in ref.fs_path + ref.subpath)
    head = 6 + len(digest) + bool(digest)  # version, policy, digest and the separators
    size = head + len(ref.master_addrs) + escaped
    if size > MAX_VOLUME_ID:
        with pytest.raises(ValueError, match=f"volume id would be {size} bytes"):
            ref.volume_id()
        return
    vid = ref.volume_id()
    assert len(vid.encode()) == size
    assert VolumeRef.from_volume_id(vid) == ref


@given(name=names.filter(lambda s: s.strip()))
def test_default_subpath_always_fits_and_is_stable(name):
    sub = default_subpath(name, "master.example:8995", "/kubernetes/volumes", "delete")
    ref = VolumeRef("master.example:8995", "/kubernetes/volumes", sub)
    assert len(ref.volume_id().encode()) <= MAX_VOLUME_ID
    assert sub == default_subpath(name, "master.example:8995", "/kubernetes/volumes", "delete")


def test_default_subpath_keeps_short_names_and_hashes_long_ones():
    assert default_subpath("pvc-1", "m:1", "/", "delete") == "pvc-1"
    # the id "2;d;<8 hex>;m:1;/;" leaves 109 bytes: a longer name keeps 92, '-', 16 hex
    assert default_subpath("x" * 109, "m:1", "/", "delete") == "x" * 109
    a = default_subpath("x" * 110, "m:1", "/", "delete")
    assert a == "x" * 92 + "-" + hashlib.sha256(b"x" * 110).hexdigest()[:16]
    b = default_subpath("x" * 109 + "y", "m:1", "/", "delete")
    assert a != b and b.startswith("x" * 92 + "-")
    # a ';' costs three bytes in the id: the kept prefix stops before one that does not fit
    name = "x" * 91 + ";" + "x" * 30
    c = default_subpath(name, "m:1", "/", "delete")
    assert c == "x" * 91 + "-" + hashlib.sha256(name.encode()).hexdigest()[:16]
    with pytest.raises(ValueError, match="'/'"):
        default_subpath("a/b", "m:1", "/", "delete")
    with pytest.raises(ValueError, match="not allowed"):
        default_subpath("..", "m:1", "/", "delete")
    with pytest.raises(ValueError, match="no room"):
        default_subpath("x" * 200, "m:1", "/" + "f" * 100, "delete")


META = {PVC_NAMESPACE: "team-a", PVC_NAME: "data-web-0", PV_NAME: "pvc-123"}


def test_path_pattern_expansion():
    pattern = PathPattern.parse(
        "${pvc.metadata.namespace}/${pvc.metadata.labels.app}-${pvc.metadata.name}"
        "/${pvc.metadata.annotations.example.com/tier}/${pv.metadata.name}$x"
    )
    assert pattern.needs_api
    got = pattern.expand(META, {"app": "web"}, {"example.com/tier": "gold"})
    assert got == "team-a/web-data-web-0/gold/pvc-123$x"
    assert not PathPattern.parse("${pvc.metadata.namespace}/${pvc.metadata.name}").needs_api


@pytest.mark.parametrize(
    "text",
    ["", "${pvc.metadata.uid}", "${pvc.metadata.labels.}", "${pvc.metadata.name", "${}", "a${b}"],
)
def test_path_pattern_syntax_errors(text):
    with pytest.raises(ValueError, match="path-pattern"):
        PathPattern.parse(text)


@pytest.mark.parametrize(
    ("pattern", "annotations"),
    [
        ("${pvc.metadata.annotations.p}", {"p": "../escape"}),
        ("${pvc.metadata.annotations.p}", {"p": "/etc"}),
        ("a/${pvc.metadata.annotations.p}/b", {"p": ""}),
        ("${pvc.metadata.annotations.p}", {"p": "x" * 256}),
        ("${pvc.metadata.annotations.p}", {"p": "a/./b"}),
        ("${pvc.metadata.annotations.p}", {}),
        ("/${pvc.metadata.name}", {}),
        ("${pvc.metadata.name}/..", {}),
    ],
)
def test_path_pattern_results_stay_inside(pattern, annotations):
    with pytest.raises(ValueError, match="path-pattern"):
        PathPattern.parse(pattern).expand(META, {}, annotations)


def test_path_pattern_needs_extra_create_metadata():
    with pytest.raises(ValueError, match="extra-create-metadata"):
        PathPattern.parse("${pvc.metadata.name}").expand({})


def test_parameters():
    params = parse_parameters(
        {
            "master-addrs": "M:1",
            "fs-path": "/k8s/",
            "on-delete": "archive",
            "path-pattern": "${pvc.metadata.name}",
            "attr-timeout": "2",
            PVC_NAME: "claim",
            "csi.storage.k8s.io/provisioner-secret-name": "s",
        }
    )
    assert (params.master_addrs, params.fs_path, params.on_delete) == ("m:1", "/k8s", "archive")
    assert params.options == mount_options.parse({"attr-timeout": "2"})
    assert params.subpath_for("pvc-9") == "claim"
    digest = hashlib.sha256(b"pvc-9").hexdigest()[:8]
    assert params.ref("claim", "pvc-9").volume_id() == f"2;a;{digest};m:1;/k8s;claim"
    defaults = parse_parameters({"master-addrs": "m"})
    assert (defaults.fs_path, defaults.on_delete, defaults.pattern) == ("/", "delete", None)
    assert defaults.subpath_for("pvc-9") == "pvc-9"
    assert parse_parameters({}, require_master=False).master_addrs is None


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({}, "master-addrs is required"),
        ({"master-addrs": "m:0"}, "port"),
        ({"master-addrs": "m", "fs-path": "rel"}, "absolute"),
        ({"master-addrs": "m", "on-delete": "shred"}, "on-delete"),
        ({"master-addrs": "m", "bogus": "1"}, "unknown parameter 'bogus'"),
        ({"master-addrs": "m", "attr-timeout": "-1"}, "attr-timeout"),
        ({"master-addrs": "m", "path-pattern": "${x}"}, "unknown placeholder"),
    ],
)
def test_bad_parameters(params, message):
    with pytest.raises(ValueError, match=message):
        parse_parameters(params)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: normalize_master_addrs(""), "master-addrs is empty"),
        (lambda: normalize_master_addrs(None), "master-addrs is empty"),
        (lambda: normalize_master_addrs("a:1,,b:1"), "empty entry"),
        (lambda: normalize_master_addrs("::1:80"), "write IPv6 addresses as"),
        (lambda: validate_subpath(""), "subpath is empty"),
        (lambda: validate_subpath(None), "subpath is empty"),
        (lambda: validate_subpath("/v"), "must be relative"),
        (lambda: VolumeRef("m:1", "/", "v", "shred"), "on-delete 'shred'"),
        (lambda: VolumeRef.from_volume_id("1;x;m:1;/;v"), "unknown on-delete code 'x'"),
        (lambda: VolumeRef.from_volume_id("2;d"), "not a fusecsi volume id"),
        (lambda: parse_parameters({}, require_master=False).ref("v", "n"), "is required"),
        (
            lambda: PathPattern.parse("${pvc.metadata.labels.app}").expand(META, {}, {}),
            "the PVC has no such label$",
        ),
        (
            lambda: PathPattern.parse("${pvc.metadata.annotations.a}").expand(META, {}, {}),
            "the PVC has no such annotation$",
        ),
    ],
)
def test_each_refusal_says_what_is_wrong(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_default_subpath_at_the_edge_of_the_budget():
    # fs-path chosen so that exactly one byte of the name is left besides '-' and 16 hex
    head = len("2;d;01234567;m:1;;")
    fs_path = "/" + "f" * (MAX_VOLUME_ID - head - 18 - 1)
    name = "abcdefghijklmnopqrs"  # 19 bytes: one more than fits
    sub = default_subpath(name, "m:1", fs_path, "delete")
    assert sub == "a-" + hashlib.sha256(name.encode()).hexdigest()[:16]
    assert default_subpath(name[:-1], "m:1", fs_path, "delete") == name[:-1]
    assert len(VolumeRef("m:1", fs_path, sub, name_digest=name_digest(name)).volume_id()) == 128
    with pytest.raises(ValueError, match="no room"):
        default_subpath(name, "m:1", fs_path + "f", "delete")
    # without master-addrs (GetCapacity-style parameters) the name is kept as it is
    assert parse_parameters({}, require_master=False).subpath_for("pvc-9") == "pvc-9"


def test_version_3_ids_name_the_engine():
    digest = name_digest("pvc-1")
    ref = VolumeRef("redis://meta:6379/1", "/k8s;x", "pvc-1", "retain", digest, "juicefs")
    vid = ref.volume_id()
    assert vid == f"3;juicefs;r;{digest};redis://meta:6379/1;/k8s%3Bx;pvc-1"
    back = VolumeRef.from_volume_id(vid)
    assert back == ref and back.engine == "juicefs" and back.address == "redis://meta:6379/1"
    # the embedded engine keeps its version 2 ids: one id per volume, as issued before
    embedded = VolumeRef("m:1", "/k8s", "pvc-1", "retain", digest)
    assert embedded.volume_id().startswith("2;r;")
    assert not embedded.same_but_digest(replace_engine(embedded, "seaweedfs"))
    context = ref.context(None)
    assert context == {"engine": "juicefs", "fs-path": "/k8s;x", "subpath": "pvc-1"}
    assert embedded.context(mount_options.DEFAULTS)["engine"] == "embedded"


def replace_engine(ref: VolumeRef, engine: str) -> VolumeRef:
    return VolumeRef(ref.address, ref.fs_path, ref.subpath, ref.on_delete, ref.name_digest, engine)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("3;ceph;d;01234567;a;/;v", "unknown engine 'ceph'"),
        ("3;embedded;d;01234567;m:1;/;v", "not a fusecsi volume id"),  # that is a version 2 id
        ("3;juicefs;d;;a;/;v", "not a fusecsi volume id"),  # no name digest
        ("3;juicefs;d;01234567;;/;v", "cluster address is empty"),
        ("3;juicefs;d;01234567;a\x01b;/;v", "control characters"),
        ("3;juicefs;d;01234567;a;/;../v", "subpath"),
        ("3;juicefs;d;01234567;a;/;" + "v" * 104, "more than 128"),  # 129 bytes
    ],
)
def test_version_3_ids_that_do_not_parse(text, message):
    with pytest.raises(ValueError, match=message):
        VolumeRef.from_volume_id(text)
    assert len(VolumeRef.from_volume_id("3;juicefs;d;01234567;a;/;" + "v" * 103).volume_id()) == 128


def test_engine_parameter():
    params = parse_parameters({"engine": "seaweedfs", "filer-addrs": "f:8888", "fs-path": "/k"})
    assert (params.engine, params.fs_path, params.master_addrs) == ("seaweedfs", "/k", None)
    assert params.cluster_params == params.engine_params == {"filer-addrs": "f:8888"}
    ref = params.ref("pvc-1", "pvc-1", address="f:8888")
    assert ref.volume_id().startswith(f"3;seaweedfs;d;{name_digest('pvc-1')};f:8888;/k;")
    assert params.context(ref) == {
        "filer-addrs": "f:8888",
        "engine": "seaweedfs",
        "fs-path": "/k",
        "subpath": "pvc-1",
    }
    embedded = parse_parameters({"master-addrs": "M:1", "engine": "embedded"})
    assert embedded.cluster_params == {"master-addrs": "m:1"} and embedded.engine == "embedded"
    with pytest.raises(ValueError, match=r"^parameter engine='ceph': unknown engine \(known: "):
        parse_parameters({"engine": "ceph"})
    # the default directory name leaves room for the longer version 3 id
    long_name = "x" * 120
    sub = default_subpath(long_name, "f:8888", "/", "delete", "seaweedfs")
    ref = VolumeRef("f:8888", "/", sub, "delete", name_digest(long_name), "seaweedfs")
    assert len(ref.volume_id()) <= MAX_VOLUME_ID


@pytest.mark.parametrize(
    ("parameters", "cluster", "options"),
    [
        ({"engine": "juicefs", "writeback": "true"}, {}, "writeback"),
        (
            {"engine": "seaweedfs", "filer-addrs": "f:8888", "cacheCapacityMB": "64"},
            {"filer-addrs": "f:8888"},
            "cacheCapacityMB=64",
        ),
        ({"engine": "curvine", "master-addrs": "m:8995"}, {"master-addrs": "m:8995"}, ""),
    ],
)
def test_another_engines_parameters_split_into_cluster_and_mount_options(
    parameters, cluster, options
):
    # one rule for every engine: not fusecsi's own and not the cluster's: a mount option,
    # checked against the engine's allow-list at CreateVolume and handed to the node
    params = parse_parameters({**parameters, "fs-path": "/k"})
    assert params.engine_params == cluster
    assert options in params.engine_options
    context = params.context(params.ref("v", "pv-1", address="a:1"))
    assert context.get("options", "") == params.engine_options


@pytest.mark.parametrize("engine", ["juicefs", "seaweedfs", "curvine"])
def test_an_unknown_mount_option_of_another_engine_is_refused_in_one_line(engine):
    cluster = {"seaweedfs": {"filer-addrs": "f:8888"}, "curvine": {"master-addrs": "m:1"}}
    with pytest.raises(ValueError) as refused:
        parse_parameters({"engine": engine, **cluster.get(engine, {}), "cache-sise": "1"})
    assert "cache-sise" in str(refused.value) and "\n" not in str(refused.value)
