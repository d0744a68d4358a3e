"""The `fusecsi` command: one subcommand per role.

Role modules are imported only when their subcommand runs, so `fusecsi mount` (started
once per FUSE daemon) does not pay for the gRPC or Kubernetes imports of other roles.
Each role module provides `configure(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from fusecsi import __version__

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "master": (
        "fusecsi.cluster.master.main",
        "run a cluster master (namespace, quotas, placement)",
    ),
    "worker": ("fusecsi.cluster.worker.main", "run a cluster worker (block storage)"),
    "fs": (
        "fusecsi.cluster.admin",
        "administer a cluster: ls, stat, mkdir, rm, mv, put, get, quota, df",
    ),
    "mount": ("fusecsi.fuse.main", "run one FUSE daemon serving a cluster path at a mountpoint"),
    "mountd": ("fusecsi.mountd.main", "run the node's mount supervisor (shared FUSE daemons)"),
    "node": ("fusecsi.node_main", "run the CSI Identity + Node services"),
    "controller": ("fusecsi.controller_main", "run the CSI Identity + Controller services"),
    "dev": ("fusecsi.dev", "run everything on one machine and play the StatefulSet walkthrough"),
}


def _load(name: str):
    module_name, _ = COMMANDS[name]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise SystemExit(f"fusecsi {name}: not available in this build") from exc
        raise


def build_parser(selected: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusecsi", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"fusecsi {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        role_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == selected:
            _load(name).configure(role_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    selected = next((a for a in argv if not a.startswith("-")), None)
    if selected not in COMMANDS:
        selected = None
    args = build_parser(selected).parse_args(argv)
    if args.command is None:
        build_parser(None).print_help()
        return 2
    return int(_load(args.command).run(args) or 0)
