"""The engines' shared CSI-level suite (the walkthrough of `fusecsi dev`) with engine curvine:
the real controller, mountd and node plugin processes on the stand-ins (curvine_local.py: no
Curvine binary can be obtained here). What it proves is fusecsi's side — Namespace over the
master wire format, the Launch mountd runs, the shared daemon, recovery, tags, on-delete
rules; not how real Curvine behaves behind them."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import pytest
import trio
from curvine_local import StandinCurvine

from fusecsi.dev.stack import DevStack, processes_under
from fusecsi.dev.walkthrough import Walkthrough

SCENARIOS = 10

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="needs root and /dev/fuse"
)


def naming(work: Path, also: bytes = b"") -> list[int]:
    """Pids of any process whose command line names a path under `work` (and `also`): the
    stand-ins run as python, which processes_under knows only by the path they name."""
    needle = str(work.resolve()).encode()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if int(pid) != os.getpid() and needle in cmdline and also in cmdline:
                found.append(int(pid))
    return found


def test_walkthrough_passes_every_scenario_on_the_standins(tmp_path, monkeypatch):
    work = tmp_path / "fusecsi-dev"  # "fusecsi" in every daemon's argv: processes_under sees it
    backend = StandinCurvine(work / "cluster")
    monkeypatch.setenv("FUSECSI_CURVINE_FUSE", str(backend.binary))  # reaches mountd
    stack = DevStack(work, engine="curvine", backend=backend)
    lines: list[str] = []
    passed = False
    daemons_after_walkthrough, left_after_stop, ours_after_stop = [None], [None], [None]
    try:
        stack.start(progress=lines.append)
        passed = trio.run(Walkthrough(stack, out=lines.append).run)
        # the last scenario unpublished everything: no stand-in curvine-fuse may still run
        daemons_after_walkthrough = naming(work, b"curvine_fuse_standin")
    finally:
        print("\n".join(lines))  # what a user would have seen: pytest shows it on failure
        stack.stop()
        left_after_stop, ours_after_stop = naming(work), processes_under(work)
        for pid in left_after_stop:  # only after a failure: the assertions below report it
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    out = "\n".join(lines)
    assert passed, out
    assert out.count("  PASS  ") == SCENARIOS, out
    assert "FAIL" not in out, out
    assert f"PASS: {SCENARIOS} scenarios" in out
    assert "stand-in master on 127.0.0.1:" in out
    for heading in ("$ kubectl get pvc", "$ kubectl get pv", "$ kubectl get pods -o wide"):
        assert heading in out
    assert "type fuse.curvinefs" in out  # the pods' volumes were stand-in curvine-fuse mounts
    # what the pods wrote went through the mount into the master's namespace
    assert any(backend.namespace_dir.glob("static/vol-0001/README"))
    with open("/proc/self/mountinfo") as table:
        assert str(work) not in table.read()
    assert daemons_after_walkthrough == []
    assert ours_after_stop == [] and left_after_stop == []  # the stand-in master too
