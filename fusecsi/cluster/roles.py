"""What the master and worker commands share: token, listening socket, metrics, flags."""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from pathlib import Path

import trio

from fusecsi import metrics
from fusecsi.rpc.addresses import parse_addr
from fusecsi.tokens import TOKEN_ENV, load_token

MASTERS_HELP = (
    "the cluster's master; more addresses only reach the same master (same data dir) "
    "elsewhere: masters do not replicate, and one of another cluster is refused"
)
LOCK_FILE = "lock"
# a holder that just died may leave a child (a master's checkpoint writer) holding the lock
# for a moment: wait that long before calling the dir busy
LOCK_WAIT = 3.0


def lock_data_dir(data_dir: str) -> int:
    """Hold an exclusive flock on `<data_dir>/lock` (made if missing) for the life of the
    process, holding our pid: two masters (or workers) on one directory would each replay,
    prune or delete what the other is writing. The descriptor is returned open on purpose."""
    path = Path(data_dir) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise OSError(
                    errno.EBUSY, f"data dir {data_dir} is in use by pid {holder} ({path})"
                ) from None
            time.sleep(0.1)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def add_common_flags(parser, default_listen: str) -> None:
    parser.add_argument("--listen", default=default_listen, metavar="HOST:PORT")
    parser.add_argument("--data-dir", required=True, metavar="DIR")
    parser.add_argument(
        "--token-file", metavar="F", help=f"file holding the cluster token (or set {TOKEN_ENV})"
    )
    metrics.add_flag(parser)
    parser.add_argument("--log-level", default="INFO")


async def bind(address: str, default_port: int) -> trio.socket.SocketType:
    """A bound TCP socket for `HOST:PORT` (the caller listens)."""
    host, port = parse_addr(address, default_port)
    sock = trio.socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        await sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {address}: {exc.strerror}") from None
    except BaseException:
        sock.close()
        raise
    return sock


def serve_metrics(address: str | None, server, *sources) -> None:
    """Serve Prometheus metrics at `address` (off when None): process metrics, the requests
    `server` answered by method and errno, and `sources` (see fusecsi.metrics)."""
    metrics.serve(address, server.calls, *sources)


# descriptors a server may hold: its connection limit follows (protocol.Server)
WANTED_FILES = 65536


def raise_file_limit() -> None:
    """Lift the soft RLIMIT_NOFILE towards the hard one (1024 is a common default, which
    would cap connections far below what one node's FUSE daemons open)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = WANTED_FILES if hard == resource.RLIM_INFINITY else min(hard, WANTED_FILES)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def run_role(role: str, args, serve) -> int:
    """The body of `run(args)` for a server role: logs, token, then `serve(args, token)`."""
    from fusecsi import logs

    logs.setup(role, args.log_level)
    raise_file_limit()
    from fusecsi.errors import report

    try:
        token = load_token(args.token_file)
    except (OSError, ValueError) as exc:
        report(role, exc)
        return 2
    try:
        lock = lock_data_dir(args.data_dir)
    except OSError as exc:
        report(role, exc)
        return 1
    try:
        trio.run(serve, args, token)
    finally:
        os.close(lock)
    return 0
