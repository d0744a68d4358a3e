"""The `fusecsi` command: one subcommand per role.

Role modules are imported only when their subcommand runs, so `fusecsi mount` (started
once per FUSE daemon) does not pay for the gRPC or Kubernetes imports of other roles.
Each role module provides `configure(parser)` and `run(args) -> int`.

Every failure a user sees is one line and no traceback: a bad argument (exit 2) or a
start-up/runtime error (exit 1), both naming what is wrong; roles that log JSON get it as
their last JSON line.
"""

from __future__ import annotations

import argparse
import errno
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
    "node": ("fusecsi.csi.node.main", "run the CSI Identity + Node services"),
    "controller": ("fusecsi.csi.controller.main", "run the CSI Identity + Controller services"),
    "dev": (
        "fusecsi.dev.main",
        "run everything on one machine and play the StatefulSet walkthrough",
    ),
}


def _load(name: str):
    module_name, _ = COMMANDS[name]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise SystemExit(f"fusecsi {name}: not available in this build") from exc
        raise


class _Parser(argparse.ArgumentParser):
    """A usage error is one line (argparse's default prints the whole usage first)."""

    roles: dict[str, argparse.ArgumentParser]

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _endpoint(value: str):
    from fusecsi.unix_socket import endpoint_path

    return endpoint_path(value)


def _master_addrs(value: str):
    # the parser the CSI side uses for `master-addrs`, so every role says the same thing
    from fusecsi.csi.volumes import normalize_master_addrs

    return normalize_master_addrs(value)


def _host_port(value: str):
    from fusecsi.rpc.addresses import parse_addr

    return parse_addr(value, 0)


def _mountpoint(value: str):
    """A missing path is a usage error; a dead FUSE mount on it is a runtime one, said so."""
    import os
    import stat

    try:
        info = os.stat(value)
    except FileNotFoundError:
        raise ValueError(f"mountpoint {value} does not exist") from None
    except OSError as exc:
        if exc.errno in (errno.ENOTCONN, errno.ECONNABORTED):
            raise OSError(
                exc.errno, f"mountpoint {value} is a dead FUSE mount: unmount it (umount -l)"
            ) from None
        raise
    if not stat.S_ISDIR(info.st_mode):
        raise ValueError(f"mountpoint {value} is not a directory")


def _metrics_address(value: str):
    from fusecsi.metrics import split_address

    return split_address(value)


# Flags several roles share, checked here once for every subcommand: dest -> check (raises
# ValueError with the reason). The roles parse the values again as they always did.
SHARED_FLAGS = {
    "master_addrs": _master_addrs,
    "listen": _host_port,
    "advertise": _host_port,
    "metrics_address": _metrics_address,
    "endpoint": _endpoint,
    "socket": _endpoint,
    "mountd": _endpoint,
    "mountpoint": _mountpoint,
}


def _check_shared_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """ValueError: a usage error (exit 2); OSError: a runtime one, raised to main."""
    for dest, check in SHARED_FLAGS.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        if dest == "mountpoint" and getattr(args, "fuse_fd", None) is not None:
            continue  # mountd mounted it already and waits for this very daemon: a stat hangs
        try:
            check(value)
        except ValueError as exc:
            # the mountpoint's message names it already
            parser.error(str(exc) if dest == "mountpoint" else f"--{dest.replace('_', '-')}: {exc}")


def build_parser(selected: str | None) -> argparse.ArgumentParser:
    parser = _Parser(prog="fusecsi", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"fusecsi {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    parser.roles = {}
    for name, (_, help_text) in COMMANDS.items():
        role_parser = parser.roles[name] = sub.add_parser(
            name, help=help_text, description=help_text
        )
        if name == selected:
            _load(name).configure(role_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    selected = next((a for a in argv if not a.startswith("-")), None)
    if selected not in COMMANDS:
        selected = None
    parser = build_parser(selected)
    args = parser.parse_args(argv)
    if args.command is None:
        build_parser(None).print_help()
        return 2
    try:
        _check_shared_flags(parser.roles[args.command], args)
        return int(_load(args.command).run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:
        from fusecsi.errors import report, unwrap

        leaf = unwrap(exc)
        if isinstance(leaf, SystemExit):
            raise leaf from None
        if isinstance(leaf, KeyboardInterrupt):
            return 130
        report(args.command, leaf)
        return 1
