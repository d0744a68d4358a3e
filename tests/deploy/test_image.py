"""The Containerfile built with podman and the image run: `fusecsi --version`, then the
walkthrough (`fusecsi dev`: a cluster, the CSI services, real FUSE mounts) in a container.

No image registry is reachable here, so the base is made locally from Debian packages with
mmdebstrap (kept as localhost/fusecsi-base:bookworm for the next run) and passed as the
Containerfile's BASE argument. podman, mmdebstrap and runc come from `make test`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from support.helm import REPO

pytestmark = pytest.mark.slow

BASE = "localhost/fusecsi-base:bookworm"
IMAGE = "localhost/fusecsi:test"
# The egress proxy's CA and pip's configuration of this machine, when it has them: the base
# carries the site's trust anchors as a site's own base image would.
SITE_CA = Path("/usr/local/share/ca-certificates")
PIP_CONF = Path("/etc/pip.conf")
# runc, not podman's default crun: crun refuses a hybrid cgroup layout whose v2 hierarchy has
# a controller (hugetlb on this machine). Limits no higher than this sandbox lets a container
# set (podman's defaults are higher).
RUN = ["podman", "run", "--rm", "--runtime", "runc", "--ulimit", "nproc=4096:4096"]


def podman(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"{proc.args} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> str:
    missing = [tool for tool in ("podman", "mmdebstrap", "runc") if not shutil.which(tool)]
    assert not missing, f"{missing} missing: `make test` installs them"
    if podman("image", "exists", BASE).returncode != 0:
        tarball = tmp_path_factory.mktemp("base") / "base.tar"
        hooks = []
        if SITE_CA.is_dir() and any(SITE_CA.iterdir()):
            hooks += [f"--customize-hook=copy-in {SITE_CA} {SITE_CA.parent}"]
        if PIP_CONF.exists():
            hooks += [f"--customize-hook=copy-in {PIP_CONF} /etc"]
        hooks += ['--customize-hook=chroot "$1" update-ca-certificates']
        ok(
            subprocess.run(
                [
                    "mmdebstrap",
                    "--variant=minbase",
                    "--include=python3,python3-venv,ca-certificates",
                ]
                + [*hooks, "bookworm", str(tarball)],
                capture_output=True,
                text=True,
                timeout=900,
            )
        )
        ok(podman("import", str(tarball), BASE))
    # chroot isolation: RUN steps need no OCI runtime (crun would refuse, see RUN)
    build = ["build", "--isolation", "chroot", "--network", "host", "--build-arg"]
    ok(podman(*build, f"BASE={BASE}", "-t", IMAGE, "-f", "Containerfile", str(REPO), timeout=1200))
    yield IMAGE
    podman("image", "prune", "--force")  # untagged layers of earlier builds


def run(*args: str, timeout: float = 120) -> str:
    """A container of the image; its output (the run must succeed)."""
    nofile = "nofile={0}:{0}".format(os.sysconf("SC_OPEN_MAX"))
    command = [*RUN, "--ulimit", nofile, *args]
    return ok(subprocess.run(command, capture_output=True, text=True, timeout=timeout))


def test_the_image_runs_fusecsi(image):
    assert run(image, "--version").strip() == "fusecsi 0.1.0"
    # the controller's user, which the chart runs it as
    assert run("--entrypoint", "id", image, "fusecsi").startswith("uid=10001(fusecsi)")


def test_the_walkthrough_passes_in_a_container(image):
    out = run("--privileged", "--device", "/dev/fuse", image, "dev", timeout=600)
    assert re.search(r"^PASS: \d+ scenarios$", out, re.M), out[-2000:]
    assert "FAIL" not in out
