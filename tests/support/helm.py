"""Helpers of the deployment tests: a real helm binary and the chart rendered by it.

helm comes from scripts/install-helm.sh (run by `make test`); without it these tests fail,
they never skip. Rendered objects are checked against the Kubernetes OpenAPI schemas that
the kubernetes-validate package ships (offline).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "fusecsi"
EXAMPLES = REPO / "helm" / "examples"
VALUES_ALL = REPO / "tests" / "deploy" / "values-all.yaml"
HELM = REPO / ".tools" / "helm" / "helm"
# The Kubernetes version the chart is rendered for, and every version objects are validated
# against: the oldest the chart supports (Chart.yaml kubeVersion) and a current one.
KUBE_VERSION = "1.35.0"
KUBE_VERSIONS = ("1.30.0", KUBE_VERSION)
NAMESPACE = "storage"
# Kinds from CRDs: no schema ships with kubernetes-validate; the tests check them by hand.
CRD_KINDS = {"ServiceMonitor"}


def run_helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    assert HELM.exists(), f"{HELM} is missing: run scripts/install-helm.sh"
    proc = subprocess.run([str(HELM), *args], capture_output=True, text=True, timeout=120, cwd=REPO)
    if check:
        assert proc.returncode == 0, f"helm {' '.join(args)} failed:\n{proc.stderr}"
    return proc


def render(*values_files: Path, sets: tuple[str, ...] = (), check: bool = True):
    args = ["template", "rel", str(CHART), "--namespace", NAMESPACE]
    args += ["--kube-version", KUBE_VERSION]
    for path in values_files:
        args += ["--values", str(path)]
    for item in sets:
        args += ["--set", item]
    proc = run_helm(*args, check=check)
    if not check:
        return proc
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def validate(doc: dict) -> None:
    """Strict schema validation (unknown fields are errors) for one object."""
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)


def find(docs: list[dict], kind: str, name_suffix: str = "") -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"expected one {kind} *{name_suffix}, got {len(found)}"
    return found[0]


def containers(doc: dict) -> dict[str, dict]:
    return {c["name"]: c for c in doc["spec"]["template"]["spec"]["containers"]}


def pod_volumes(doc: dict) -> dict[str, dict]:
    return {v["name"]: v for v in doc["spec"]["template"]["spec"]["volumes"]}


def fusecsi_roles(docs: list[dict]) -> dict[str, list[str]]:
    """The args of every fusecsi container in the rendered objects, by role."""
    roles = {}
    for doc in docs:
        if doc["kind"] not in ("Deployment", "DaemonSet", "StatefulSet"):
            continue
        for container in containers(doc).values():
            if container["image"].split("/")[-1].split(":")[0] == "fusecsi":
                roles[container["args"][0]] = container["args"]
    return roles


def flags_of(args: list[str]) -> set[str]:
    return {arg.split("=", 1)[0] for arg in args if arg.startswith("--")}


def contract_flags() -> dict[str, set[str]]:
    """The role flags table of docs/contracts.md (the chart passes only these)."""
    text = (REPO / "docs" / "contracts.md").read_text()
    section = text.split("## Role flags", 1)[1].split("\n## ", 1)[0]
    table = {}
    for line in section.splitlines():
        match = re.match(r"\| `fusecsi (\w+)` \| (.*) \|$", line)
        if match:
            # "Every long-running role takes --metrics-address" (same document).
            table[match[1]] = set(re.findall(r"--[a-z][a-z0-9-]*", match[2])) | {
                "--metrics-address"
            }
    return table
