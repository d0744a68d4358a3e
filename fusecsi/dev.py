"""`fusecsi dev`: the whole driver on one machine, and the StatefulSet walkthrough.

Starts a cluster (master + 2 workers), the CSI controller and two simulated nodes (mountd +
node plugin each), plays the users' scenarios through the real CSI sockets, prints what a
user would see and exits non-zero if anything is wrong.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import trio

from fusecsi import logs


def configure(parser) -> None:
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="where sockets, logs, state and cluster data go (default: a new temporary directory)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the work directory (logs) after the run"
    )


def run(args) -> int:
    logs.setup("dev", "WARNING")
    # imported here so `fusecsi --help` stays light
    from fusecsi.devstack import DevStack
    from fusecsi.walkthrough import Walkthrough

    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="fusecsi-dev-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    stack = DevStack(work_dir.resolve())
    print(f"fusecsi walkthrough in {work_dir} (logs in {work_dir / 'logs'})", flush=True)
    passed = False
    try:
        stack.start(progress=lambda line: print(f"==> {line}", flush=True))
        passed = trio.run(Walkthrough(stack, out=lambda line: print(line, flush=True)).run)
    finally:
        stack.stop()
        if passed and not args.keep and args.work_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)
        elif not passed:
            print(f"logs kept in {work_dir / 'logs'}")
    print(f"walkthrough took {time.monotonic() - started:.1f}s")
    return 0 if passed else 1
