"""Set-up on a fresh machine: apt's lock held by another apt (cloud-init after boot) is
waited for, not a failure; smoke benchmark runs never replace committed results."""

from __future__ import annotations

import fcntl
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BENCHMARKS = REPO / "benchmarks"


def test_apt_install_waits_while_another_apt_holds_the_lock():
    fd = os.open("/var/lib/apt/lists/lock", os.O_RDWR | os.O_CREAT, 0o640)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)  # as apt-get update takes it
        proc = subprocess.run(
            [str(REPO / "scripts" / "apt-install.sh"), "fusecsi-no-such-package"],
            env={**os.environ, "APT_LOCK_WAIT": "6"},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        os.close(fd)
    assert "waiting for another apt to finish" in proc.stdout
    assert proc.returncode == 1 and "Could not get lock" in proc.stderr


def test_make_installs_through_the_waiting_script():
    makefile = (REPO / "Makefile").read_text()
    assert "@scripts/apt-install.sh $(1)" in makefile
    assert "apt-get" not in makefile  # every install goes through the script
    bench = makefile.split("\nbench:")[1]
    assert "$(call apt_install,fio)" in bench


def test_quick_benchmark_runs_write_beside_the_committed_results():
    scripts = [p for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_")]
    for script in scripts:
        text = script.read_text()
        assert "write_text(" not in text, f"{script.name} writes results itself"
    writers = [p.name for p in scripts if "_results.write(" in p.read_text()]
    assert sorted(writers) == ["cluster.py", "controller.py", "fuse_io.py", "publish.py"]
    quick = subprocess.run(
        [
            "python3",
            "-c",
            "import _results; print(_results.directory(True)); print(_results.directory(False))",
        ],
        cwd=BENCHMARKS,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert quick == [str(BENCHMARKS / "results" / "quick"), str(BENCHMARKS / "results")]
    assert "benchmarks/results/quick/" in (REPO / ".gitignore").read_text().splitlines()
