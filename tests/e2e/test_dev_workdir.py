"""`fusecsi dev --work-dir`: a directory that is not ours is refused, one an earlier run used is
emptied first (never a scenario on old data), and `--keep-running` leaves the stack up with
the command that stops it."""

from __future__ import annotations

import re
import subprocess
import sys

from fusecsi.dev.main import MARKER, prepare
from fusecsi.dev.stack import leftover_mounts, processes_under
from fusecsi.rpc.blocking import call_sync


def dev(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fusecsi", "dev", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_a_foreign_non_empty_work_dir_is_refused(tmp_path):
    (tmp_path / "precious.txt").write_text("mine")
    proc = dev("--work-dir", str(tmp_path), timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"fusecsi dev: work dir {tmp_path} is not empty and was not made by fusecsi dev: "
        "give a new or empty directory"
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["precious.txt"]


def test_a_used_work_dir_starts_clean(tmp_path):
    (tmp_path / MARKER).write_text("")
    (tmp_path / "cluster" / "master").mkdir(parents=True)
    (tmp_path / "cluster" / "master" / "journal.log").write_text("old data")
    assert prepare(tmp_path) == tmp_path.resolve()
    assert [p.name for p in tmp_path.iterdir()] == [MARKER]


def test_keep_running_leaves_the_stack_up_until_stop(tmp_path):
    work = tmp_path / "dev"
    proc = dev("--work-dir", str(work), "--keep-running")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"stop it with: fusecsi dev --work-dir {work} --stop" in proc.stdout
    master = re.search(r"cluster\s+--master-addrs (\S+)", proc.stdout).group(1)
    try:
        assert call_sync(master, "cluster_info", timeout=10)["cluster_id"]
        assert processes_under(work)
        again = dev("--work-dir", str(work), timeout=60)
        assert again.returncode == 2
        assert again.stderr.splitlines() == [
            f"fusecsi dev: a stack still runs in {work}: "
            f"stop it first with `fusecsi dev --work-dir {work} --stop`"
        ]
    finally:
        stopped = dev("--work-dir", str(work), "--stop", timeout=120)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert processes_under(work) == [] and leftover_mounts(work) == []
