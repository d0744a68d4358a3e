"""helm/examples: valid Kubernetes objects that use fusecsi the way the chart sets it up."""

from __future__ import annotations

import pytest
import yaml
from support.helm import CHART, EXAMPLES, NAMESPACE, find, render, validate

from fusecsi.csi import volumes

EXAMPLE_FILES = sorted(p.name for p in EXAMPLES.glob("*.yaml"))


def load(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((EXAMPLES / name).read_text()) if doc]


def test_examples_exist():
    assert {"storageclass.yaml", "statefulset.yaml"} <= set(EXAMPLE_FILES)


@pytest.mark.parametrize("name", EXAMPLE_FILES)
def test_example_matches_the_kubernetes_schema(name):
    docs = load(name)
    assert docs
    for doc in docs:
        validate(doc)


def test_storage_class_example():
    (storage_class,) = load("storageclass.yaml")
    assert storage_class["provisioner"] == "csi.fusecsi.io"
    params = volumes.parse_parameters(storage_class["parameters"])  # what CreateVolume accepts
    assert params.on_delete == "archive"
    assert {"master-addrs", "fs-path", "on-delete"} <= set(storage_class["parameters"])
    assert storage_class["allowVolumeExpansion"] is True


def test_storage_class_example_uses_the_charts_embedded_cluster():
    """Installed as README says (release and namespace "fusecsi"), the chart's master Service
    and token Secret are the ones the example names."""
    (storage_class,) = load("storageclass.yaml")
    docs = render(sets=("fullnameOverride=fusecsi",))
    charts = find(docs, "StorageClass")["parameters"]
    params = storage_class["parameters"]
    assert params["master-addrs"] == charts["master-addrs"].replace(f".{NAMESPACE}:", ".fusecsi:")
    for key, value in charts.items():
        if key.endswith("-secret-name"):
            assert params[key] == value


def test_statefulset_example():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    docs = {doc["kind"]: doc for doc in load("statefulset.yaml")}
    service, statefulset = docs["Service"], docs["StatefulSet"]
    assert service["spec"]["clusterIP"] == "None"
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["selector"] == statefulset["spec"]["selector"]["matchLabels"]
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["storageClassName"] == values["cluster"]["storageClass"]["name"]
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    (mount,) = container["volumeMounts"]
    assert mount["name"] == claim["metadata"]["name"]
    # lets running pods see a mount that mountd re-bound after a FUSE daemon crash
    assert mount["mountPropagation"] == "HostToContainer"
    assert "securityContext" not in container  # HostToContainer needs no privilege
