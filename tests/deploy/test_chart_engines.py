"""helm/fusecsi with a StorageClass of each engine: valid objects, the right parameters, the
JuiceFS metadata URL (it holds credentials) only ever in a Secret, and the schema's per-engine
rules (an unknown engine, an address the engine does not take, a missing one)."""

from __future__ import annotations

import json

import pytest
import yaml
from support.helm import (
    CHART,
    CRD_KINDS,
    EXAMPLES,
    NAMESPACE,
    containers,
    find,
    pod_volumes,
    render,
    run_helm,
    validate,
)

from fusecsi import engines

METAURL = "redis://:Engine-Test-s3cret@redis.storage:6379/1"
PASSWORD = "Engine-Test-s3cret"
SECRET = {"name": "juicefs-meta", "namespace": NAMESPACE}
# One StorageClass entry per engine, as a user writes it in values.
CLASSES = {
    "embedded": {"masterAddrs": "master-0.fusecsi:8995", "fsPath": "/k8s"},
    "juicefs": {"fsPath": "/k8s", "secret": SECRET},
    "seaweedfs": {"filerAddrs": "filer-0.seaweedfs:8888,filer-1.seaweedfs:8888", "fsPath": "/k8s"},
    "curvine": {"masterAddrs": "curvine-master-0.curvine:8995", "fsPath": "/k8s"},
}
# The parameter naming each engine's cluster; juicefs has none (the Secret's metaurl).
ADDRESS = {"embedded": "master-addrs", "seaweedfs": "filer-addrs", "curvine": "master-addrs"}
ADDRESS_VALUE = {"master-addrs": "masterAddrs", "filer-addrs": "filerAddrs"}


def values(*classes: dict, secrets: list | None = None, **extra) -> dict:
    """Values of a release on external clusters only (no embedded cluster)."""
    return (
        {"cluster": {"embedded": False}, "storageClasses": list(classes)}
        | ({"secrets": secrets} if secrets else {})
        | extra
    )


def render_values(tmp_path, data: dict, check: bool = True):
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(data))
    return render(path, check=check)


def engine_class(engine: str, **fields) -> dict:
    return {"name": f"fusecsi-{engine}", "engine": engine, **CLASSES[engine], **fields}


def test_the_chart_knows_every_engine_fusecsi_has():
    assert set(CLASSES) == set(engines.NAMES)


@pytest.mark.parametrize("engine", engines.NAMES)
def test_a_storage_class_of_each_engine(tmp_path, engine):
    secrets = [{**SECRET, "stringData": {"metaurl": METAURL}}] if engine == "juicefs" else None
    docs = render_values(tmp_path, values(engine_class(engine), secrets=secrets))
    for doc in docs:
        if doc["kind"] not in CRD_KINDS:
            validate(doc)
    storage_class = find(docs, "StorageClass")
    params = storage_class["parameters"]
    assert params["engine"] == engine
    assert params["fs-path"] == "/k8s"
    addresses = {"master-addrs", "filer-addrs"} & set(params)
    if engine == "juicefs":
        assert not addresses  # the cluster is the metadata URL, in the Secret only
        for call in ("provisioner", "controller-expand", "node-publish"):
            assert params[f"csi.storage.k8s.io/{call}-secret-name"] == SECRET["name"]
            assert params[f"csi.storage.k8s.io/{call}-secret-namespace"] == NAMESPACE
    else:
        assert addresses == {ADDRESS[engine]}
        assert params[ADDRESS[engine]] == CLASSES[engine][ADDRESS_VALUE[ADDRESS[engine]]]
        assert not [k for k in params if k.startswith("csi.storage.k8s.io/")]
    # no embedded cluster in a release on external clusters
    kinds = {doc["kind"] for doc in docs}
    assert "StatefulSet" not in kinds
    assert not [d for d in docs if d["metadata"]["name"].endswith(("-worker", "-cluster-token"))]


def test_the_embedded_engine_left_out_renders_no_engine_parameter(tmp_path):
    """A StorageClass's parameters cannot change: classes written before engines existed
    render exactly as they did."""
    entry = {"name": "old", **CLASSES["embedded"]}
    params = find(render_values(tmp_path, values(entry)), "StorageClass")["parameters"]
    assert params == {"master-addrs": "master-0.fusecsi:8995", "fs-path": "/k8s"}


def test_the_juicefs_metadata_url_is_only_in_its_secret(tmp_path):
    """Made from values (a trial), the metaurl is in that Secret and nowhere else: not in any
    StorageClass, workload or RBAC object; the controller may read the Secret, by name."""
    secrets = [{**SECRET, "stringData": {"metaurl": METAURL}}]
    everything = [engine_class(engine) for engine in engines.NAMES]
    docs = render_values(tmp_path, values(*everything, secrets=secrets))
    holders = [d for d in docs if PASSWORD in json.dumps(d)]
    assert [(d["kind"], d["metadata"]["name"]) for d in holders] == [("Secret", "juicefs-meta")]
    assert holders[0]["stringData"] == {"metaurl": METAURL}
    for storage_class in (d for d in docs if d["kind"] == "StorageClass"):
        params = storage_class["parameters"]
        assert not [k for k in params if "meta" in k.lower() or "url" in k.lower()]
        assert not [v for v in params.values() if "://" in v]
    [role] = [d for d in docs if d["kind"] == "Role" and d["metadata"]["name"].endswith("-secrets")]
    assert role["rules"][0]["resourceNames"] == ["juicefs-meta"]
    assert role["rules"][0]["verbs"] == ["get"]


@pytest.mark.parametrize(
    "parameters, complaint",
    [
        ({"metaurl": METAURL}, "'metaurl'"),
        ({"meta-url": METAURL}, "a metadata URL goes into the Secret"),
        ({"cache-url": METAURL}, "parameter cache-url holds a URL with credentials"),
    ],
)
def test_a_metadata_url_in_parameters_is_refused(tmp_path, parameters, complaint):
    """The schema refuses the key; the template refuses a URL with credentials under any key
    (both one line, neither echoing the URL)."""
    entry = engine_class("juicefs", parameters=parameters)
    proc = render_values(tmp_path, values(entry), check=False)
    assert proc.returncode != 0
    assert complaint in proc.stderr
    if "'" not in complaint:  # the template's message names the class
        assert "StorageClass fusecsi-juicefs: parameter" in proc.stderr
    assert PASSWORD not in proc.stderr


@pytest.mark.parametrize(
    "entry, complaint",
    [
        ({"engine": "nfs", "masterAddrs": "m:1", "fsPath": "/k8s"}, "value must be one of"),
        ({"engine": "juicefs", "fsPath": "/k8s"}, "missing propert"),  # no Secret
        ({**CLASSES["juicefs"], "engine": "juicefs", "masterAddrs": "m:1"}, "masterAddrs"),
        ({"engine": "seaweedfs", "fsPath": "/k8s"}, "filerAddrs"),
        ({"engine": "curvine", "fsPath": "/k8s"}, "masterAddrs"),
        ({**CLASSES["curvine"], "engine": "curvine", "filerAddrs": "f:1"}, "filerAddrs"),
        ({**CLASSES["embedded"], "filerAddrs": "f:1"}, "filerAddrs"),
        # the embedded engine's FUSE options are a closed list; other engines check their own
        ({**CLASSES["embedded"], "parameters": {"cache-size": "1"}}, "'cache-size'"),
        (
            {**CLASSES["seaweedfs"], "engine": "seaweedfs", "parameters": {"fs-path": "/x"}},
            "fs-path",
        ),
    ],
)
def test_schema_rejects_what_an_engine_does_not_take(tmp_path, entry, complaint):
    proc = render_values(tmp_path, values({"name": "x", **entry}), check=False)
    assert proc.returncode != 0
    assert complaint in proc.stderr, proc.stderr


def test_seaweedfs_masters_and_mount_options(tmp_path):
    """SeaweedFS's masters are optional (GetCapacity only); its `weed mount` options are the
    StorageClass's mountOptions."""
    entry = engine_class("seaweedfs", masterAddrs="master.seaweedfs:9333")
    entry["mountOptions"] = ["cacheCapacityMB=256", "readOnly=true"]
    storage_class = find(render_values(tmp_path, values(entry)), "StorageClass")
    assert storage_class["parameters"]["master-addrs"] == "master.seaweedfs:9333"
    assert storage_class["parameters"]["filer-addrs"] == CLASSES["seaweedfs"]["filerAddrs"]
    assert storage_class["mountOptions"] == ["cacheCapacityMB=256", "readOnly=true"]
    validate(storage_class)
    entry["mountOptions"] = ["cacheCapacityMB 256"]
    proc = render_values(tmp_path, values(entry), check=False)
    assert proc.returncode != 0 and "mountOptions" in proc.stderr


def test_mountd_env_reaches_mountd_for_curvine_fuse(tmp_path):
    """FUSECSI_CURVINE_FUSE (curvine-fuse somewhere off PATH) is set through mountd.env."""
    path = "/opt/curvine/curvine-fuse"
    data = values(engine_class("curvine"), mountd={"env": {"FUSECSI_CURVINE_FUSE": path}})
    mountd = containers(find(render_values(tmp_path, data), "DaemonSet", "-mountd"))["mountd"]
    assert {"name": "FUSECSI_CURVINE_FUSE", "value": path} in mountd["env"]
    data["mountd"]["env"] = {"NODE_NAME": "x"}  # the chart's own
    assert render_values(tmp_path, data, check=False).returncode != 0


def test_juicefs_takes_three_per_call_secrets_instead_of_one(tmp_path):
    refs = {
        "provisionerSecret": {"name": "jfs-ctl", "namespace": "team-a"},
        "controllerExpandSecret": {"name": "jfs-ctl", "namespace": "team-a"},
        "nodePublishSecret": {"name": "jfs-node", "namespace": "team-a"},
    }
    entry = {"name": "j", "engine": "juicefs", "fsPath": "/k8s", **refs}
    params = find(render_values(tmp_path, values(entry)), "StorageClass")["parameters"]
    assert params["csi.storage.k8s.io/node-publish-secret-name"] == "jfs-node"
    assert params["csi.storage.k8s.io/provisioner-secret-name"] == "jfs-ctl"
    partial = {**entry, "nodePublishSecret": None}
    del partial["nodePublishSecret"]
    proc = render_values(tmp_path, values(partial), check=False)
    assert proc.returncode != 0 and "missing propert" in proc.stderr


@pytest.mark.parametrize(
    "engine, mode, privileged",
    [
        ("juicefs", "auto", True),
        ("juicefs", "never", False),
        ("seaweedfs", "auto", False),
        ("curvine", "always", True),  # for juicefs classes made outside the chart
    ],
)
def test_the_controller_mounts_only_for_juicefs(tmp_path, engine, mode, privileged):
    """JuiceFS makes directories and xattrs only through a client: the controller's private
    `juicefs mount` needs a privileged container with /dev/fuse, and root for the CSI socket
    its sidecars share. Otherwise the controller stays as it was: non-root, no capability."""
    data = values(engine_class(engine), controller={"privateMounts": mode})
    docs = render_values(tmp_path, data)
    controller = find(docs, "Deployment", "-controller")
    pod = controller["spec"]["template"]["spec"]
    fusecsi = containers(controller)["fusecsi"]
    mounts = {m["name"]: m["mountPath"] for m in fusecsi["volumeMounts"]}
    validate(controller)
    if privileged:
        assert fusecsi["securityContext"] == {"privileged": True, "readOnlyRootFilesystem": True}
        assert mounts["fuse-device"] == "/dev/fuse"
        assert pod_volumes(controller)["fuse-device"]["hostPath"] == {
            "path": "/dev/fuse",
            "type": "CharDevice",
        }
        assert pod["securityContext"]["runAsUser"] == 0
        assert "runAsNonRoot" not in pod["securityContext"]
    else:
        assert not fusecsi["securityContext"].get("privileged")
        assert fusecsi["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        assert "fuse-device" not in mounts and "fuse-device" not in pod_volumes(controller)
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 10001
    # the sidecars never get more than before
    for name, container in containers(controller).items():
        if name != "fusecsi":
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_secrets_from_values_default_to_the_release_namespace(tmp_path):
    secrets = [{"name": "jfs", "stringData": {"metaurl": METAURL}}]
    entry = engine_class("juicefs", secret={"name": "jfs", "namespace": NAMESPACE})
    secret = find(render_values(tmp_path, values(entry, secrets=secrets)), "Secret", "jfs")
    assert secret["metadata"]["namespace"] == NAMESPACE and secret["type"] == "Opaque"
    validate(secret)


# helm/examples: one StorageClass per engine (storageclass.yaml is the embedded cluster's;
# test_helm_examples.py checks every file against the Kubernetes schema).
EXAMPLES_BY_ENGINE = {
    "embedded": "storageclass.yaml",
    "juicefs": "storageclass-juicefs.yaml",
    "seaweedfs": "storageclass-seaweedfs.yaml",
    "curvine": "storageclass-curvine.yaml",
}
# StorageClass parameter -> the chart's field for it
FIELDS = {
    "master-addrs": "masterAddrs",
    "filer-addrs": "filerAddrs",
    "fs-path": "fsPath",
    "on-delete": "onDelete",
    "path-pattern": "pathPattern",
}
CALLS = {
    "provisioner": "provisionerSecret",
    "controller-expand": "controllerExpandSecret",
    "node-publish": "nodePublishSecret",
}


def as_values_entry(storage_class: dict) -> dict:
    """The chart's storageClasses entry that renders this StorageClass."""
    params = dict(storage_class["parameters"])
    entry = {"name": storage_class["metadata"]["name"]}
    if "engine" in params:
        entry["engine"] = params.pop("engine")
    for key, field in FIELDS.items():
        if key in params:
            entry[field] = params.pop(key)
    for call, field in CALLS.items():
        name = params.pop(f"csi.storage.k8s.io/{call}-secret-name", None)
        namespace = params.pop(f"csi.storage.k8s.io/{call}-secret-namespace", None)
        if name:
            entry[field] = {"name": name, "namespace": namespace}
    if params:
        entry["parameters"] = params
    for key in ("reclaimPolicy", "allowVolumeExpansion", "volumeBindingMode", "mountOptions"):
        if key in storage_class:
            entry[key] = storage_class[key]
    return entry


def test_an_example_storage_class_for_every_engine():
    assert set(EXAMPLES_BY_ENGINE) == set(engines.NAMES)
    assert set(EXAMPLES_BY_ENGINE.values()) <= {p.name for p in EXAMPLES.glob("*.yaml")}


@pytest.mark.parametrize("engine", engines.NAMES)
def test_each_example_is_what_the_chart_renders_for_its_engine(tmp_path, engine):
    """The chart's schema accepts the example as values and renders the same StorageClass."""
    (example,) = yaml.safe_load_all((EXAMPLES / EXAMPLES_BY_ENGINE[engine]).read_text())
    params = example["parameters"]
    assert params.get("engine", "embedded") == engine
    if engine == "juicefs":
        assert not {"master-addrs", "filer-addrs"} & set(params)
        assert {params[f"csi.storage.k8s.io/{call}-secret-name"] for call in CALLS} == {
            "juicefs-meta"
        }
    docs = render_values(tmp_path, values(as_values_entry(example)))
    rendered = find(docs, "StorageClass")
    for key in ("provisioner", "parameters", "mountOptions", "reclaimPolicy"):
        assert rendered.get(key) == example.get(key), key
    assert rendered["allowVolumeExpansion"] == example["allowVolumeExpansion"]


def test_notes_say_the_controller_is_privileged_and_where_the_metaurl_is(tmp_path):
    path = tmp_path / "values.yaml"
    secrets = [{**SECRET, "stringData": {"metaurl": METAURL}}]
    path.write_text(yaml.safe_dump(values(engine_class("juicefs"), secrets=secrets)))
    args = ["install", "rel", str(CHART), "--namespace", NAMESPACE, "--dry-run=client"]
    notes = run_helm(*args, "--values", str(path)).stdout.split("NOTES:", 1)[1]
    assert f"fusecsi-juicefs  ->  juicefs, metadata URL in Secret {NAMESPACE}/juicefs-meta" in notes
    assert "The controller holds private JuiceFS mounts: its fusecsi container is privileged" in (
        " ".join(notes.split())
    )
    assert f"The Secret {NAMESPACE}/juicefs-meta was made by this chart from values" in notes
    assert PASSWORD not in notes
