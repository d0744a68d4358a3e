"""helm/fusecsi rendered by a real helm, every object checked against the Kubernetes schemas,
and the properties that matter asserted: propagation, privilege, RBAC, update strategy."""

from __future__ import annotations

import copy
import json
import re

import kubernetes_validate
import pytest
import yaml
from support.helm import (
    CHART,
    CRD_KINDS,
    KUBE_VERSIONS,
    NAMESPACE,
    VALUES_ALL,
    containers,
    find,
    pod_volumes,
    render,
    run_helm,
    validate,
)

from fusecsi import mount_options
from fusecsi.csi import volumes

RENDERS = ["defaults", "all-options"]
# The one container that must be privileged (mount syscalls, Bidirectional propagation).
PRIVILEGED = {("DaemonSet", "mountd", "mountd")}


def workloads(docs):
    for doc in docs:
        if doc["kind"] in ("Deployment", "DaemonSet", "StatefulSet"):
            component = doc["metadata"]["labels"]["app.kubernetes.io/component"]
            yield doc, component


def test_values_are_documented_line_by_line():
    """Every key in values.yaml has a comment right above it (resource amounts excepted)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented = [
        line
        for previous, line in zip(lines, lines[1:], strict=False)
        if re.match(r"^\s*[A-Za-z][\w-]*:", line)
        and not previous.lstrip().startswith("#")
        and not re.match(r"^\s*(requests|limits):", line)
    ]
    assert not undocumented
    assert re.match(r"^# ", lines[0])


def test_kubernetes_versions(helm_version):
    """The chart refuses clusters older than the oldest version the tests validate against."""
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["kubeVersion"] == f">={KUBE_VERSIONS[0]}-0"
    proc = run_helm("template", "rel", str(CHART), "--kube-version", "1.29.9", check=False)
    assert proc.returncode != 0 and "kubeVersion" in proc.stderr


def test_helm_lint(helm_version):
    assert helm_version.startswith("v"), helm_version
    for extra in ([], ["--values", str(VALUES_ALL)]):
        proc = run_helm("lint", "--strict", str(CHART), *extra)
        assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("which", RENDERS)
def test_every_object_matches_the_kubernetes_schema(renders, which):
    docs = renders[which]
    assert len(docs) >= 12
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            continue
        validate(doc)


def test_the_validator_rejects_a_broken_object(default_docs):
    mountd = copy.deepcopy(find(default_docs, "DaemonSet", "-mountd"))
    mountd["spec"]["updateStrategy"]["typo"] = "OnDelete"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(mountd)


def test_defaults_deploy_the_embedded_cluster_and_no_metrics(default_docs):
    kinds = sorted(doc["kind"] for doc in default_docs)
    assert kinds.count("DaemonSet") == 3 and kinds.count("Deployment") == 1
    assert kinds.count("StatefulSet") == 1 and kinds.count("Secret") == 1
    assert kinds.count("ServiceAccount") == 3 and "ServiceMonitor" not in kinds
    service = find(default_docs, "Service", "-master")
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"] == [
        {"name": "master", "port": 8995, "targetPort": "master", "protocol": "TCP"}
    ]
    # the StorageClass names the in-cluster master by its Service, and the generated token
    storage_class = find(default_docs, "StorageClass")
    params = storage_class["parameters"]
    assert params["master-addrs"] == "rel-fusecsi-master.storage:8995"
    assert params["fs-path"] == "/k8s"
    for call in ("provisioner", "controller-expand", "node-publish"):
        assert params[f"csi.storage.k8s.io/{call}-secret-name"] == "rel-fusecsi-cluster-token"
        assert params[f"csi.storage.k8s.io/{call}-secret-namespace"] == NAMESPACE
    ref = volumes.VolumeRef(params["master-addrs"], "/k8s", f"pvc-{'0' * 36}", "delete")
    assert len(ref.volume_id()) <= 128
    master = find(default_docs, "StatefulSet", "-master")
    assert master["spec"]["replicas"] == 1
    assert master["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    [claim] = master["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "10Gi"
    args = containers(master)["master"]["args"]
    assert args[args.index("--data-dir") + 1] == "/data"
    assert {"name": "data", "mountPath": "/data"} in containers(master)["master"]["volumeMounts"]
    worker = find(default_docs, "DaemonSet", "-worker")
    args = containers(worker)["worker"]["args"]
    assert args[args.index("--master-addrs") + 1] == params["master-addrs"]
    assert args[args.index("--advertise") + 1] == "$(POD_IP):8997"
    assert pod_volumes(worker)["data"]["hostPath"]["path"] == "/var/lib/fusecsi-worker"
    for doc, container in ((master, "master"), (worker, "worker")):
        assert args_value(containers(doc)[container], "--token-file").startswith("/etc/fusecsi/")
        assert pod_volumes(doc)["token"]["secret"]["secretName"] == "rel-fusecsi-cluster-token"


def args_value(container: dict, flag: str) -> str:
    return container["args"][container["args"].index(flag) + 1]


@pytest.mark.parametrize("which", RENDERS)
def test_workers_share_their_short_circuit_socket_dir_with_mountd(renders, values_all, which):
    docs = renders[which]
    worker = find(docs, "DaemonSet", "-worker")
    socket = args_value(containers(worker)["worker"], "--local-socket")
    socket_dir = socket.rsplit("/", 1)[0]
    expected = "/run/fusecsi-worker" if which == "defaults" else "/run/fusecsi-w"
    assert socket_dir == expected
    assert pod_volumes(worker)["socket-dir"]["hostPath"]["path"] == socket_dir
    mountd = find(docs, "DaemonSet", "-mountd")
    mounted = {
        m["mountPath"]: pod_volumes(mountd)[m["name"]]["hostPath"]["path"]
        for m in containers(mountd)["mountd"]["volumeMounts"]
    }
    assert mounted[socket_dir] == socket_dir  # the path the worker reports is mountd's too
    # workers land on mountd's nodes
    for key in ("nodeSelector", "tolerations", "affinity"):
        spec = worker["spec"]["template"]["spec"]
        assert spec.get(key) == mountd["spec"]["template"]["spec"].get(key)


def test_the_token_secret_is_made_once_and_kept(default_docs):
    secret = find(default_docs, "Secret", "-cluster-token")
    assert secret["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert len(secret["data"]["token"]) == 64  # 48 random characters, base64
    template = (CHART / "templates" / "cluster-token.yaml").read_text()
    assert 'lookup "v1" "Secret"' in template  # an upgrade reuses the stored token


def test_an_external_cluster_is_a_values_switch():
    docs = render(sets=("cluster.embedded=false",))
    kinds = sorted(doc["kind"] for doc in docs)
    assert "StatefulSet" not in kinds and "Secret" not in kinds and "StorageClass" not in kinds
    assert kinds.count("DaemonSet") == 2 and "Service" not in kinds
    mountd = containers(find(docs, "DaemonSet", "-mountd"))["mountd"]
    assert not [m for m in mountd["volumeMounts"] if m["name"].startswith("worker-socket-")]


@pytest.mark.parametrize("which", RENDERS)
def test_csidriver(renders, which):
    spec = find(renders[which], "CSIDriver")["spec"]
    assert find(renders[which], "CSIDriver")["metadata"]["name"] == "csi.fusecsi.io"
    assert spec["attachRequired"] is False
    assert spec["podInfoOnMount"] is True
    assert spec["volumeLifecycleModes"] == ["Persistent"]
    assert spec["fsGroupPolicy"] == {"defaults": "File", "all-options": "None"}[which]


@pytest.mark.parametrize("which", RENDERS)
def test_only_mountd_is_privileged(renders, which):
    seen = set()
    for doc, component in workloads(renders[which]):
        for name, container in containers(doc).items():
            security = container.get("securityContext", {})
            if (doc["kind"], component, name) in PRIVILEGED:
                assert security.get("privileged") is True
                seen.add((doc["kind"], component, name))
            else:
                assert not security.get("privileged"), (component, name)
                assert security.get("allowPrivilegeEscalation") is False, (component, name)
                assert security["capabilities"]["drop"] == ["ALL"], (component, name)
    assert seen == PRIVILEGED


@pytest.mark.parametrize("which", RENDERS)
def test_mount_propagation(renders, values_all, which):
    kubelet_dir = "/var/lib/kubelet" if which == "defaults" else "/var/lib/k0s/kubelet"
    state_dir = "/var/lib/fusecsi" if which == "defaults" else values_all["mountd"]["stateDir"]
    bidirectional = set()
    for doc, component in workloads(renders[which]):
        vols = pod_volumes(doc)
        for name, container in containers(doc).items():
            for mount in container.get("volumeMounts", []):
                mode = mount.get("mountPropagation", "None")
                if mode == "None":
                    continue
                assert mode == "Bidirectional", (component, name, mount)
                assert container["securityContext"]["privileged"] is True
                # the same path inside and outside, so target paths mean the same thing
                assert vols[mount["name"]]["hostPath"]["path"] == mount["mountPath"]
                bidirectional.add((component, mount["mountPath"]))
    assert bidirectional == {("mountd", kubelet_dir), ("mountd", state_dir)}
    # the node plugin makes no mounts and reads nothing under the kubelet dir
    node = find(renders[which], "DaemonSet", "-node")
    assert "kubelet-dir" not in pod_volumes(node)


@pytest.mark.parametrize("which", RENDERS)
def test_mountd_daemonset(renders, values_all, which):
    mountd = find(renders[which], "DaemonSet", "-mountd")
    spec = mountd["spec"]["template"]["spec"]
    assert mountd["spec"]["updateStrategy"] == {"type": "OnDelete"}
    priority = "system-node-critical" if which == "defaults" else "system-cluster-critical"
    assert spec["priorityClassName"] == priority
    vols = pod_volumes(mountd)
    assert vols["fuse-device"]["hostPath"] == {"path": "/dev/fuse", "type": "CharDevice"}
    container = containers(mountd)["mountd"]
    assert {"name": "fuse-device", "mountPath": "/dev/fuse"} in container["volumeMounts"]
    assert "livenessProbe" not in container  # a restart would kill every FUSE daemon
    # daemons in cgroups of their own under the host's tree, found again by host pid
    assert spec["hostPID"] is True
    cgroup = "fusecsi" if which == "defaults" else values_all["mountd"]["daemonCgroup"]
    assert args_value(container, "--daemon-cgroup") == f"/sys/fs/cgroup/{cgroup}"
    assert vols["cgroup"]["hostPath"] == {"path": "/sys/fs/cgroup", "type": "Directory"}
    assert {"name": "cgroup", "mountPath": "/sys/fs/cgroup"} in container["volumeMounts"]
    assert container["resources"]["limits"]["memory"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    sockets = [m for m in container["volumeMounts"] if m["name"].startswith("worker-socket-")]
    if which == "defaults":
        assert "FUSECSI_SHORT_CIRCUIT" not in env
        assert container["resources"] == {
            "requests": {"cpu": "50m", "memory": "64Mi"},
            "limits": {"memory": "256Mi"},
        }
    if which == "all-options":
        assert env["FUSECSI_SHORT_CIRCUIT"] == "0"
        # a worker's socket is reached at the very path the worker reports
        assert sockets == [
            {"name": "worker-socket-0", "mountPath": "/var/lib/curvine/worker", "readOnly": True},
            {"name": "worker-socket-1", "mountPath": "/run/fusecsi-w", "readOnly": True},
        ]
        assert vols["worker-socket-0"]["hostPath"]["path"] == "/var/lib/curvine/worker"
        assert container["resources"] == values_all["mountd"]["resources"]
        assert vols["state-dir"]["hostPath"]["path"] == "/var/lib/fusecsi-test"
        # helm merges maps with the defaults (kubernetes.io/os: linux stays)
        assert values_all["nodePlacement"]["nodeSelector"].items() <= spec["nodeSelector"].items()
    # the node plugin must land where mountd is
    node_spec = find(renders[which], "DaemonSet", "-node")["spec"]["template"]["spec"]
    for key in ("nodeSelector", "tolerations", "affinity"):
        assert node_spec.get(key) == spec.get(key)


@pytest.mark.parametrize("which", RENDERS)
def test_node_plugin_reaches_mountd_through_a_shared_host_dir(renders, which):
    docs = renders[which]
    node = find(docs, "DaemonSet", "-node")
    mountd = find(docs, "DaemonSet", "-mountd")
    node_args = containers(node)["fusecsi"]["args"]
    mountd_args = containers(mountd)["mountd"]["args"]
    socket = mountd_args[mountd_args.index("--socket") + 1]
    assert node_args[node_args.index("--mountd") + 1] == socket
    socket_dir = socket.removeprefix("unix://").rsplit("/", 1)[0]
    for doc in (node, mountd):
        assert pod_volumes(doc)["mountd-socket-dir"]["hostPath"]["path"] == socket_dir
    assert node_args[node_args.index("--node-id") + 1] == "$(NODE_NAME)"
    env = containers(node)["fusecsi"]["env"]
    assert {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}} in env


@pytest.mark.parametrize("which", RENDERS)
def test_node_registration_paths(renders, which):
    kubelet_dir = "/var/lib/kubelet" if which == "defaults" else "/var/lib/k0s/kubelet"
    node = find(renders[which], "DaemonSet", "-node")
    vols = pod_volumes(node)
    assert vols["plugin-dir"]["hostPath"]["path"] == f"{kubelet_dir}/plugins/csi.fusecsi.io"
    assert vols["registration-dir"]["hostPath"]["path"] == f"{kubelet_dir}/plugins_registry"
    registrar = containers(node)["node-driver-registrar"]["args"]
    assert f"--kubelet-registration-path={kubelet_dir}/plugins/csi.fusecsi.io/csi.sock" in registrar
    assert set(containers(node)) == {"fusecsi", "node-driver-registrar", "liveness-probe"}


@pytest.mark.parametrize("which", RENDERS)
def test_controller_deployment(renders, values_all, which):
    controller = find(renders[which], "Deployment", "-controller")
    pod = controller["spec"]["template"]["spec"]
    replicas = 1 if which == "defaults" else values_all["controller"]["replicas"]
    assert controller["spec"]["replicas"] == replicas
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == (10001 if which == "defaults" else 20000)
    names = containers(controller)
    assert set(names) == {"fusecsi", "csi-provisioner", "csi-resizer", "liveness-probe"}
    provisioner = names["csi-provisioner"]["args"]
    for flag in ("--leader-election", "--extra-create-metadata"):
        assert flag in provisioner
    timeout = "60s" if which == "defaults" else "90s"
    assert f"--timeout={timeout}" in provisioner
    assert f"--leader-election-namespace={NAMESPACE}" in provisioner
    assert "--leader-election" in names["csi-resizer"]["args"]
    if which == "defaults":
        for name in ("csi-provisioner", "csi-resizer", "liveness-probe"):
            assert names[name]["image"].startswith("registry.k8s.io/sig-storage/")


def rules_of(docs, kind, name_suffix):
    return find(docs, kind, name_suffix)["rules"]


def verbs(rules) -> dict[tuple[str, str], set[str]]:
    table = {}
    for rule in rules:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                table.setdefault((group, resource), set()).update(rule["verbs"])
    return table


@pytest.mark.parametrize("which", RENDERS)
def test_rbac_has_no_wildcards_and_least_privilege(renders, which):
    docs = renders[which]
    for doc in docs:
        for rule in doc.get("rules", []):
            for key in ("apiGroups", "resources", "verbs", "resourceNames"):
                assert "*" not in rule.get(key, []), (doc["metadata"]["name"], rule)
    mountd = verbs(rules_of(docs, "ClusterRole", "-mountd"))
    assert mountd == {("", "pods"): {"get"}, ("", "events"): {"create", "patch"}}
    controller = verbs(rules_of(docs, "ClusterRole", "-controller"))
    assert "get" in controller[("", "persistentvolumeclaims")]
    assert controller[("", "events")] == {"create", "patch"}
    assert ("", "secrets") not in controller  # only per-Secret Roles
    assert ("", "pods") not in controller and ("", "nodes") not in controller
    assert ("storage.k8s.io", "volumeattachments") not in controller
    assert controller[("storage.k8s.io", "volumeattributesclasses")] == {"get"}
    assert not {verb for verb in controller[("", "persistentvolumeclaims")]} - {
        "get",
        "list",
        "watch",
        "update",
    }
    lease = verbs(rules_of(docs, "Role", "-leader-election"))
    assert lease == {("coordination.k8s.io", "leases"): {"get", "create", "update"}}
    # the node plugin has a service account and no permissions at all
    bound = {
        subject["name"]
        for doc in docs
        if doc["kind"] in ("RoleBinding", "ClusterRoleBinding")
        for subject in doc["subjects"]
    }
    assert not any(name.endswith("-node") for name in bound)
    node_sa = find(docs, "ServiceAccount", "-node")
    assert node_sa["automountServiceAccountToken"] is False


def test_secrets_readable_only_by_name(all_docs, default_docs):
    [default_role] = [d for d in default_docs if d["kind"] == "Role" and "secrets" in str(d)]
    assert default_role["metadata"]["namespace"] == NAMESPACE
    assert default_role["rules"][0]["resourceNames"] == ["rel-fusecsi-cluster-token"]
    roles = {
        d["metadata"]["namespace"]: d["rules"]
        for d in all_docs
        if d["kind"] == "Role" and d["metadata"]["name"].endswith("-controller-secrets")
    }
    assert roles == {
        "storage": [
            {
                "apiGroups": [""],
                "resources": ["secrets"],
                # juicefs-meta from a class's `secret`; its nodePublishSecret is the kubelet's
                "resourceNames": ["fusecsi-token", "juicefs-meta", "storage-fusecsi-cluster-token"],
                "verbs": ["get"],
            }
        ],
        "team-b": [
            {
                "apiGroups": [""],
                "resources": ["secrets"],
                "resourceNames": ["outside-token", "scratch-token"],
                "verbs": ["get"],
            }
        ],
    }
    bindings = [
        d
        for d in all_docs
        if d["kind"] == "RoleBinding" and d["metadata"]["name"].endswith("-controller-secrets")
    ]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["storage", "team-b"]
    for binding in bindings:
        assert binding["subjects"][0]["name"] == "storage-fusecsi-controller"


def test_storage_classes_from_values(all_docs):
    classes = {d["metadata"]["name"]: d for d in all_docs if d["kind"] == "StorageClass"}
    engines = {"fusecsi-juicefs", "fusecsi-seaweedfs", "fusecsi-curvine"}  # test_chart_engines
    assert set(classes) == {"fusecsi", "fusecsi-scratch", "fusecsi-cluster"} | engines
    embedded = classes["fusecsi-cluster"]
    assert embedded["parameters"]["master-addrs"] == "storage-fusecsi-master.storage:9995"
    assert embedded["parameters"]["fs-path"] == "/pvs"
    assert embedded["reclaimPolicy"] == "Retain" and "annotations" not in embedded["metadata"]
    main = classes["fusecsi"]
    assert main["provisioner"] == "csi.fusecsi.io"
    assert main["metadata"]["annotations"] == {
        "storageclass.kubernetes.io/is-default-class": "true"
    }
    assert main["reclaimPolicy"] == "Retain"
    assert main["allowVolumeExpansion"] is False
    assert main["volumeBindingMode"] == "WaitForFirstConsumer"
    assert main["parameters"] == {
        "master-addrs": "master-0.fusecsi.storage:8995,master-1.fusecsi.storage:8995",
        "fs-path": "/k8s",
        "path-pattern": "${pvc.metadata.namespace}/${pvc.metadata.name}",
        "on-delete": "archive",
        "csi.storage.k8s.io/provisioner-secret-name": "fusecsi-token",
        "csi.storage.k8s.io/provisioner-secret-namespace": "storage",
        "csi.storage.k8s.io/controller-expand-secret-name": "fusecsi-token",
        "csi.storage.k8s.io/controller-expand-secret-namespace": "storage",
        "csi.storage.k8s.io/node-publish-secret-name": "fusecsi-token",
        "csi.storage.k8s.io/node-publish-secret-namespace": "storage",
        "attr-timeout": "2",
        "writeback-cache": "true",
    }
    for name in classes.keys() - engines - {"fusecsi-scratch"}:  # what CreateVolume accepts
        volumes.parse_parameters(classes[name]["parameters"])
    scratch = classes["fusecsi-scratch"]
    params = dict(scratch["parameters"])
    assert params.pop("engine") == "embedded"  # set in values, so rendered
    volumes.parse_parameters(params)
    assert "annotations" not in scratch["metadata"]
    assert scratch["reclaimPolicy"] == "Delete"
    assert scratch["allowVolumeExpansion"] is True
    assert scratch["volumeBindingMode"] == "Immediate"


def test_metrics_services_and_service_monitor(all_docs):
    services = [d for d in all_docs if d["kind"] == "Service"]
    metrics = [s for s in services if s["metadata"]["name"].endswith("-metrics")]
    assert sorted(s["metadata"]["labels"]["app.kubernetes.io/component"] for s in metrics) == [
        "controller",
        "master",
        "mountd",
        "node",
        "worker",
    ]
    services = metrics
    for doc, component in workloads(all_docs):
        fusecsi = next(c for c in containers(doc).values() if c["args"][0] == component)
        args = fusecsi["args"]
        assert args[args.index("--metrics-address") + 1] == "0.0.0.0:9900"
        ports = {p["name"]: p["containerPort"] for p in fusecsi["ports"]}
        assert ports["metrics"] == 9900
        service = next(
            s for s in services if s["metadata"]["name"].endswith(f"{component}-metrics")
        )
        assert service["spec"]["selector"] == doc["spec"]["selector"]["matchLabels"]
    monitor = find(all_docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["endpoints"] == [
        {"port": "metrics", "path": "/metrics", "interval": "15s"}
    ]
    labels = monitor["spec"]["selector"]["matchLabels"]
    assert all(labels.items() <= s["metadata"]["labels"].items() for s in services)


def test_images_and_pull_settings(all_docs, values_all):
    for doc, _ in workloads(all_docs):
        spec = doc["spec"]["template"]["spec"]
        assert spec["imagePullSecrets"] == [{"name": "regcred"}]
        for container in spec["containers"]:
            assert container["image"].startswith("registry.example.com/")
            assert container["imagePullPolicy"] == "Always"
        assert spec["containers"][0]["image"] == "registry.example.com/storage/fusecsi:0.1.0-test"


@pytest.mark.parametrize(
    "bad, complaint",
    [
        ("csiDriver.fsGroupPolicy=Sometimes", "fsGroupPolicy"),
        ("storageClasses[0].name=x", "masterAddrs"),
        ("mountd.stateDir=relative/dir", "stateDir"),
        ("kubeletDir=", "kubeletDir"),
        ("metrics.port=80", "port"),
        ("controller.runAsUser=0", "runAsUser"),
        ("metrics.port=9808", "port"),
        ("controller.resources.requests.cpu=lots", "cpu"),
        ("mountd.updateStrategy=RollingUpdate", "updateStrategy"),
        ("mountd.daemonCgroup=/sys/fs/cgroup/x", "daemonCgroup"),
        ("cluster.worker.dataDir=relative", "dataDir"),
        ("cluster.master.replication=0", "replication"),
        ("cluster.storageClass.reclaimPolicy=Recycle", "reclaimPolicy"),
    ],
)
def test_schema_rejects_bad_values(bad, complaint):
    proc = render(sets=(bad,), check=False)
    assert proc.returncode != 0
    assert complaint in proc.stderr


def test_storage_class_parameters_are_the_fuse_options():
    schema = json.loads((CHART / "values.schema.json").read_text())
    [embedded] = [
        rule["then"]
        for rule in schema["definitions"]["storageClass"]["allOf"]
        if rule["if"] == {"properties": {"engine": {"const": "embedded"}}}
    ]  # engine embedded, or left out
    parameters = embedded["properties"]["parameters"]
    assert parameters["propertyNames"]["enum"] == list(mount_options.OPTIONS)
    proc = render(
        sets=(
            "storageClasses[0].name=x",
            "storageClasses[0].masterAddrs=m:8995",
            "storageClasses[0].fsPath=/k8s",
            "storageClasses[0].parameters.max-read=4096",
        ),
        check=False,
    )
    assert proc.returncode != 0 and "'max-read'" in proc.stderr


def test_storage_class_parameters_cannot_override_the_named_keys():
    proc = render(
        sets=(
            "storageClasses[0].name=x",
            "storageClasses[0].masterAddrs=m:8995",
            "storageClasses[0].fsPath=/k8s",
            "storageClasses[0].parameters.fs-path=/other",
        ),
        check=False,
    )
    assert proc.returncode != 0 and "'fs-path'" in proc.stderr


def test_notes_tell_the_user_what_to_do(helm_version):
    proc = run_helm(
        "install", "rel", str(CHART), "--namespace", NAMESPACE, "--dry-run=client",
        "--values", str(VALUES_ALL),
    )  # fmt: skip
    notes = proc.stdout.split("NOTES:", 1)[1]
    assert "kubectl get csidriver csi.fusecsi.io" in notes
    assert "fusecsi  ->  master-0.fusecsi.storage:8995,master-1.fusecsi.storage:8995:/k8s" in notes
    assert notes.count("storage/fusecsi-token") == 1 and "team-b/scratch-token" in notes
    assert "OnDelete" in notes and "delete its mountd pod" in notes
    assert "storage-fusecsi-master.storage:9995" in notes
    assert "Secret storage/storage-fusecsi-cluster-token" in notes
    assert "storage/storage-fusecsi-cluster-token must exist" not in notes  # the chart makes it
    assert "the new mountd adopts them" in notes
    assert (
        "fusecsi-seaweedfs  ->  seaweedfs filer-0.seaweedfs:8888,filer-1.seaweedfs:8888:/buckets/k8s"
        in notes
    )
    assert "fusecsi-curvine  ->  curvine curvine-master-0.curvine:8995:/k8s" in notes
    assert (
        "fusecsi-juicefs  ->  juicefs, metadata URL in Secret storage/juicefs-meta-nodes:/k8s"
        in notes
    )
    assert "values-all-password" not in notes
    assert notes.count("was made by this chart from values: fine for a trial") == 2
    assert "controller.privateMounts is never: this controller cannot create volumes" in notes
    external = run_helm(
        "install", "rel", str(CHART), "--dry-run=client", "--set", "cluster.embedded=false",
        "--set", "mountd.daemonCgroup=",
    ).stdout.split("NOTES:", 1)[1]  # fmt: skip
    assert "No StorageClass was created" in external and "drain the node" in external


def option_paths(schema: dict, node: dict, prefix: str = "") -> set[str]:
    """Every option the schema names (closed objects, walked through $ref and arrays)."""
    if "$ref" in node:
        node = schema["definitions"][node["$ref"].rsplit("/", 1)[1]]
    if node.get("type") == "array" and "items" in node:
        return option_paths(schema, node["items"], prefix + "[]")
    if node.get("additionalProperties") is not False:
        return set()
    paths = set()
    for key, child in node["properties"].items():
        path = f"{prefix}.{key}" if prefix else key
        paths |= {path} | option_paths(schema, child, path)
    return paths


def present_paths(value, prefix: str = "") -> set[str]:
    paths = set()
    if isinstance(value, dict):
        for key, child in value.items():
            path = f"{prefix}.{key}" if prefix else key
            paths |= {path} | present_paths(child, path)
    elif isinstance(value, list):
        for item in value:
            paths |= present_paths(item, prefix + "[]")
    return paths


def test_values_all_exercises_every_option(values_all):
    schema = json.loads((CHART / "values.schema.json").read_text())
    options = {
        path
        for path in option_paths(schema, schema)
        if path != "global" and not path.endswith((".requests", ".limits"))  # Kubernetes' own
    }
    missing = options - present_paths(values_all)
    assert not missing, sorted(missing)
    assert {"storageClasses[].parameters", "mountd.healthInterval"} <= options
