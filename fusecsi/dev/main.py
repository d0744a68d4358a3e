"""`fusecsi dev`: the whole driver on one machine, and the StatefulSet walkthrough.

Starts a cluster (the embedded master + 2 workers, or with `--engine` a JuiceFS or
SeaweedFS one from their real binaries), the CSI controller and two simulated nodes (mountd +
node plugin each), plays the users' scenarios through the real CSI sockets, prints what a
user would see and exits non-zero if anything is wrong.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import trio

from fusecsi import engines, logs

# a work dir holding this file was made by `fusecsi dev`: a later run may empty it
MARKER = ".fusecsi-dev"


def configure(parser) -> None:
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="where sockets, logs, state and cluster data go (default: a new temporary "
        "directory); one used by an earlier run is emptied first, any other must be empty",
    )
    parser.add_argument(
        "--engine",
        default=engines.DEFAULT,
        choices=[name for name in engines.NAMES if name != "curvine"],
        help="the filesystem the walkthrough runs on: the embedded cluster (default), or a "
        "JuiceFS (Redis metadata, a local-directory bucket) or SeaweedFS (master, volume "
        "server, filer) cluster started here from their real binaries",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the work directory (logs) after the run"
    )
    parser.add_argument(
        "--keep-running",
        action="store_true",
        help="leave every process running after the walkthrough, to look around; "
        "prints how to stop them",
    )
    parser.add_argument(
        "--stop",
        action="store_true",
        help="stop a stack left running in --work-dir by --keep-running, and exit",
    )


class Refused(Exception):
    """The work dir cannot be used; the message says why and what to do."""


def prepare(work_dir: Path | None) -> Path:
    """A work dir to start in: a new one, an empty one, or one an earlier run used (emptied,
    so no scenario meets old data). Refused: anything else, or one whose stack still runs."""
    from fusecsi.dev.stack import leftover_mounts, processes_under

    if work_dir is None:
        work_dir = Path(tempfile.mkdtemp(prefix="fusecsi-dev-"))
    elif work_dir.exists() and not work_dir.is_dir():
        raise Refused(f"work dir {work_dir} is not a directory")
    elif work_dir.exists() and any(work_dir.iterdir()):
        if not (work_dir / MARKER).exists():
            raise Refused(
                f"work dir {work_dir} is not empty and was not made by fusecsi dev: "
                "give a new or empty directory"
            )
        if processes_under(work_dir) or leftover_mounts(work_dir):
            raise Refused(
                f"a stack still runs in {work_dir}: "
                f"stop it first with `fusecsi dev --work-dir {work_dir} --stop`"
            )
        for entry in work_dir.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / MARKER).write_text("made by fusecsi dev; emptied by the next run\n")
    return work_dir.resolve()


def stop(work_dir: Path | None) -> int:
    from fusecsi.dev.stack import stop_everything_under

    if work_dir is None:
        print("fusecsi dev: --stop needs the --work-dir of the stack", file=sys.stderr)
        return 2
    count = stop_everything_under(work_dir)
    print(f"stopped {count} processes under {work_dir}")
    return 0


def print_running(stack, work_dir: Path) -> None:
    print(f"\nthe stack keeps running in {work_dir}:")
    if stack.engine == "embedded":
        print(f"  cluster     --master-addrs {stack.master_addrs}")
    else:
        print(f"  cluster     {stack.engine}: {stack.backend.describe()}")
    print(f"  controller  unix://{stack.controller_socket}")
    for node in stack.nodes:
        print(f"  {node.name:<11} unix://{node.csi_socket} (mountd unix://{node.mountd_socket})")
    print(f"  logs        {work_dir / 'logs'}")
    if stack.engine == "embedded":
        print(f"  e.g. fusecsi fs --master-addrs {stack.master_addrs} ls /")
    print(f"stop it with: fusecsi dev --work-dir {work_dir} --stop")


def run(args) -> int:
    if args.stop:
        return stop(args.work_dir)
    logs.setup("dev", "WARNING")
    # imported here so `fusecsi --help` stays light
    from fusecsi.dev.stack import DevStack
    from fusecsi.dev.walkthrough import Walkthrough

    try:
        work_dir = prepare(args.work_dir)
    except Refused as exc:
        print(f"fusecsi dev: {exc}", file=sys.stderr)
        return 2
    started = time.monotonic()
    stack = DevStack(work_dir, engine=args.engine)
    print(f"fusecsi walkthrough in {work_dir} (logs in {work_dir / 'logs'})", flush=True)
    passed = False
    keep_running = False
    try:
        try:
            stack.start(progress=lambda line: print(f"==> {line}", flush=True))
        except (engines.BadParameter, FileNotFoundError) as exc:
            # an engine that cannot run here (its binary is missing): one line, exit 2
            print(f"fusecsi dev: {exc}", file=sys.stderr)
            return 2
        passed = trio.run(Walkthrough(stack, out=lambda line: print(line, flush=True)).run)
        keep_running = args.keep_running
    finally:
        if keep_running:
            print_running(stack, work_dir)
        else:
            stack.stop()
            if passed and not args.keep and args.work_dir is None:
                shutil.rmtree(work_dir, ignore_errors=True)
            elif not passed:
                print(f"logs kept in {work_dir / 'logs'}")
    print(f"walkthrough took {time.monotonic() - started:.1f}s")
    return 0 if passed else 1
