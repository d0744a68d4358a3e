"""The Containerfile, read as the instructions it is (no container engine runs here), and its
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
from support.helm import CHART, REPO

BASE = "python:3.11-slim-bookworm"
BUILD_ONLY = ("gcc", "pkg-config", "libfuse3-dev", "build-essential", "python3-dev")


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


def test_two_stages_on_the_base_argument_default_slim_bookworm():
    assert instructions()[0] == ("ARG", f"BASE={BASE}")
    build, final = stages()
    assert build["image"] == "${BASE}" and build["name"] == "build"
    assert final["image"] == "${BASE}" and final["name"] == ""


def test_build_stage_compiles_wheels_of_this_package():
    build = stages()[0]
    for package in ("gcc", "pkg-config", "libfuse3-dev"):
        assert re.search(rf"apt-get install .*\b{re.escape(package)}\b", runs(build)), package
    copies = [rest for keyword, rest in build["steps"] if keyword == "COPY"]
    assert any("pyproject.toml" in c for c in copies)
    assert re.search(r"pip wheel .*--wheel-dir /wheels \.$", runs(build), re.M)


def test_final_stage_has_runtime_only(pyproject):
    final = stages()[1]
    text = runs(final)
    for package in BUILD_ONLY:
        assert not re.search(rf"\b{re.escape(package)}\b", text), package
    assert re.search(r"apt-get install .*\bfuse3\b", text)
    assert ("COPY", "--from=build /wheels /wheels") in final["steps"]
    name = pyproject["project"]["name"]
    assert re.search(rf"pip install [^\n]*--no-index[^\n]* {name}( |$)", text, re.M)
    assert "rm -rf /wheels" in text


def test_entrypoint_is_the_fusecsi_command(pyproject):
    final = stages()[1]
    entry = [rest for keyword, rest in final["steps"] if keyword == "ENTRYPOINT"]
    assert len(entry) == 1 and json.loads(entry[0]) == ["fusecsi"]
    assert "fusecsi" in pyproject["project"]["scripts"]


def test_controller_user_exists_in_the_image():
    """The chart runs the controller as a uid the image creates; node and mountd stay root."""
    text = runs(stages()[1])
    values = yaml.safe_load((CHART / "values.yaml").read_text())["controller"]
    assert re.search(rf"useradd .*--uid {values['runAsUser']}\b", text)
    assert re.search(rf"groupadd .*--gid {values['runAsGroup']}\b", text)
    users = [rest for keyword, rest in stages()[1]["steps"] if keyword == "USER"]
    assert users in ([], ["root"], ["0"])


def test_the_build_stage_copies_everything_the_wheel_needs(tmp_path, pyproject):
    """Build the wheel from only what the build stage COPYs: every module and the entry point."""
    context = tmp_path / "context"
    for keyword, rest in stages()[0]["steps"]:
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
