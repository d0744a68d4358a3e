"""docs/engines/deploy.md (the README's deploy text for engines) is true as written: its
values render with the chart into the StorageClasses it describes, and the versions, paths,
names and messages it quotes are the Containerfile's, the chart's and the examples'."""

from __future__ import annotations

import re
import shlex

import pytest
import yaml
from support.helm import EXAMPLES, REPO, find, render

DOC = REPO / "docs" / "engines" / "deploy.md"


@pytest.fixture(scope="module")
def text() -> str:
    return DOC.read_text()


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def containerfile_args() -> dict[str, str]:
    text = (REPO / "Containerfile").read_text()
    return dict(re.findall(r'^ARG ([A-Z_]+)="?([^"\n]*)"?$', text, re.M))


def test_the_versions_and_paths_are_the_containerfiles(text):
    args = containerfile_args()
    flat = " ".join(text.split())
    for pin in args["ENGINE_WHEELS"].split():
        name, version = pin.split("==")
        assert f"`{name}` {version}" in flat, pin
    assert f"`{args['CURVINE_FUSE_PATH']}`" in flat
    message = r'echo "(curvine-fuse from) \$CURVINE_IMAGE (does not run on this base)"'
    check = re.search(message, (REPO / "Containerfile").read_text())
    assert f"`{check[1]} <image> {check[2]}`" in flat
    assert f"`{check[1]} … {check[2]}`" in flat


def test_the_build_command_builds_with_a_curvine_image(text):
    [build] = [b for b in blocks(text, "sh") if "podman build" in b]
    args = shlex.split(build.replace("\\\n", " "))
    assert args[args.index("-f") + 1] == "Containerfile" and args[-1] == "."
    assert args[args.index("--build-arg") + 1].startswith("CURVINE_IMAGE=")


@pytest.fixture(scope="module")
def rendered(text, tmp_path_factory) -> list[dict]:
    [values] = blocks(text, "yaml")
    path = tmp_path_factory.mktemp("doc") / "values.yaml"
    path.write_text(values)
    return render(path)


def test_the_values_render_the_classes_of_the_examples(text, rendered):
    classes = {d["metadata"]["name"]: d for d in rendered if d["kind"] == "StorageClass"}
    assert {c["parameters"]["engine"] for c in classes.values()} == {
        "juicefs",
        "seaweedfs",
        "curvine",
    }
    assert not [d for d in rendered if d["kind"] == "StatefulSet"]  # cluster.embedded: false
    for name, storage_class in classes.items():
        params = storage_class["parameters"]
        example = EXAMPLES / f"storageclass-{params['engine']}.yaml"
        assert f"`{example.name}`" in text
        (expected,) = yaml.safe_load_all(example.read_text())
        assert expected["metadata"]["name"] == name
        # the same cluster and Secret; the examples add an on-delete of their own
        expected["parameters"].pop("on-delete")
        assert params == expected["parameters"]
        assert storage_class.get("mountOptions") == expected.get("mountOptions")


def test_the_controller_it_describes_is_the_charts(text, rendered):
    """The doc's values have a juicefs class: the chart makes the controller privileged."""
    controller = find(rendered, "Deployment", "-controller")
    (fusecsi,) = [c for c in controller["spec"]["template"]["spec"]["containers"]
                  if c["name"] == "fusecsi"]  # fmt: skip
    assert fusecsi["securityContext"]["privileged"] is True
    assert "`controller.privateMounts`" in text and "`/dev/fuse`" in text
