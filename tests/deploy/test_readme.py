"""README's "Using fusecsi in Kubernetes" is true as written: the names it quotes are the ones
the chart renders for its install command, and the status it shows is the real CLI's."""

from __future__ import annotations

import re
import shlex

import pytest
import yaml
from support.helm import CHART, REPO, containers, find, pod_volumes, run_helm

from fusecsi.mountd.status import format_table


@pytest.fixture(scope="module")
def section() -> str:
    text = (REPO / "README.md").read_text()
    return text.split("## Using fusecsi in Kubernetes", 1)[1].split("\n## ", 1)[0]


def commands(section: str, program: str) -> list[list[str]]:
    """The shell commands of the section's sh block that run `program`."""
    block = section.split("```sh\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    lines = [line.split("#", 1)[0] for line in block.splitlines()]
    return [shlex.split(line) for line in lines if line.startswith(program)]


def test_the_image_build_command_uses_the_containerfile(section):
    [build] = [c for c in commands(section, "podman") if c[1] == "build"]
    assert build[build.index("-f") + 1] == "Containerfile" and build[-1] == "."
    [push] = [c for c in commands(section, "podman") if c[1] == "push"]
    assert push[2] == build[build.index("-t") + 1]


def test_the_names_quoted_are_what_the_install_command_renders(section):
    [install] = commands(section, "helm install")
    release, chart = install[2], install[3]
    assert (REPO / chart).resolve() == CHART
    args = install[4:]
    namespace = args[args.index("--namespace") + 1]
    sets = [a for i, a in enumerate(args) if i and args[i - 1] == "--set"]
    rendered = run_helm("template", release, str(CHART), "--namespace", namespace,
                        *[f"--set={s}" for s in sets]).stdout  # fmt: skip
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    storage_class = find(docs, "StorageClass")
    master_addrs = storage_class["parameters"]["master-addrs"]
    token = storage_class["parameters"]["csi.storage.k8s.io/provisioner-secret-name"]
    master = find(docs, "StatefulSet", "-master")
    worker = find(docs, "DaemonSet", "-worker")
    quoted = {
        f"`{master_addrs}`",
        f"Secret `{token}`",
        f"StorageClass `{storage_class['metadata']['name']}`",
        f"`{storage_class['parameters']['fs-path']}`",
        f"`{pod_volumes(worker)['data']['hostPath']['path']}`",
        master["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"],
        f"exec -n {namespace} {master['metadata']['name']}-0 -- fusecsi fs --master-addrs "
        f"{master_addrs}",
    }
    flat = " ".join(section.split())
    assert [q for q in quoted if q not in flat] == []
    token_file = containers(master)["master"]["args"]
    assert f"--token-file {token_file[token_file.index('--token-file') + 1]}" in flat
    # the image the README pushes is the one the chart runs
    repository = sets[0].split("=", 1)[1]
    assert containers(master)["master"]["image"].startswith(repository + ":")


def test_the_status_sample_has_the_real_columns(section):
    sample = section.split("fusecsi mountd status\n", 1)[1].splitlines()[0]
    assert sample.split() == format_table([]).split()
    assert re.search(
        r"^\$ kubectl exec -n \S+ <mountd pod> -- fusecsi mountd status$", section, re.M
    )
