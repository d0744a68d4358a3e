"""`fusecsi mount`: serve one cluster subtree at a mountpoint, in the foreground.

pyfuse3's structure: one FUSE session per process, `init` -> `trio.run(serve)` -> `close`.
fs-path is checked on the cluster first (a missing path is a clear error, nothing is
mounted). With `--ready-fd N` the daemon writes READY to fd N once the mount answers a
stat, so a supervisor can wait for it; on failure it writes nothing and exits non-zero.
SIGTERM/SIGINT commit buffered writes, unmount and exit 0.

With `--fuse-fd N --connection DIR` the daemon serves a FUSE connection someone else mounted
and keeps (takeover.py): it may be the first daemon of that mount or the replacement of a
dead one, and on SIGTERM it commits and exits without unmounting (the owner unmounts, or
starts the next daemon: an upgrade).
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import stat

import pyfuse3
import trio

from fusecsi import errors, logs, metrics, mount_options
from fusecsi.csi.volumes import normalize_fs_path  # the one rule mountd and the CSI roles apply
from fusecsi.fuse import kernel, takeover
from fusecsi.fuse.handles import HandleTable, adopt_handles
from fusecsi.fuse.operations import Operations
from fusecsi.fuse.takeover import Takeover
from fusecsi.logs import fields
from fusecsi.tokens import TOKEN_ENV, load_token

log = logging.getLogger("fusecsi.mount")

MAX_TASKS = 64
WRITE_EVERY = 2.0  # seconds between rewrites of the metrics file


def configure(parser) -> None:
    parser.add_argument("--master-addrs", required=True, help="cluster masters, host:port[,...]")
    parser.add_argument("--fs-path", required=True, help="cluster directory to serve")
    parser.add_argument(
        "--options", default="", help="mount options k=v,... (see fusecsi/mount_options.py)"
    )
    parser.add_argument("--token-file", help=f"file holding the cluster token (or set {TOKEN_ENV})")
    parser.add_argument("--ready-fd", type=int, help="write READY to this fd once mounted")
    parser.add_argument(
        "--fuse-fd", type=int, help="serve this mounted /dev/fuse descriptor (with --connection)"
    )
    parser.add_argument("--connection", metavar="DIR", help="the connection's INIT and handles")
    metrics.add_flag(parser)
    parser.add_argument(
        "--metrics-file",
        metavar="F",
        help="rewrite this file with the daemon's metrics every few seconds (mountd re-exports it)",
    )
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("mountpoint")


class Settings:
    def __init__(self, args) -> None:
        self.master_addrs = args.master_addrs.strip()
        if not self.master_addrs:
            raise ValueError("--master-addrs is empty")
        self.fs_path = normalize_fs_path(args.fs_path)
        self.options = mount_options.parse_arg(args.options)
        self.mountpoint = os.path.abspath(args.mountpoint)
        self.fuse_fd = args.fuse_fd
        self.connection = args.connection
        if (self.fuse_fd is None) != (self.connection is None):
            raise ValueError("--fuse-fd and --connection go together")
        # a mounted connection answers only once we serve it: no stat of it before
        if self.fuse_fd is None and not os.path.isdir(self.mountpoint):
            raise ValueError(f"mountpoint {self.mountpoint} is not a directory")
        self.ready_fd = args.ready_fd
        self.metrics_address = args.metrics_address
        self.metrics_file = args.metrics_file
        self.token = load_token(args.token_file)
        self.io_timeout = float(self.options["io-timeout"])


def _client(settings: Settings):
    from fusecsi.cluster.client import ClusterClient

    return ClusterClient(settings.master_addrs, token=settings.token, timeout=settings.io_timeout)


async def _preflight(settings: Settings) -> int:
    """The cluster inode of fs-path (served as the mount's root)."""
    client = _client(settings)
    async with client:
        with trio.fail_after(settings.io_timeout):
            attr = await client.resolve(settings.fs_path)
    if not stat.S_ISDIR(attr.mode):
        raise NotADirectoryError(errno.ENOTDIR, "not a directory")
    return attr.ino


async def _serve(ops: Operations, settings: Settings, taking: Takeover | None) -> int:
    client = _client(settings)
    async with client, trio.open_nursery() as nursery:
        ops.client = client
        ops.spawn = nursery.start_soon
        with trio.move_on_after(settings.io_timeout):
            try:
                ops.set_block_size(int((await client.statfs())["block_size"]))
            except Exception as exc:  # keep the default; the first requests will tell
                log.warning("cluster block size unknown", extra=fields(err=str(errors.unwrap(exc))))
        if taking is not None:
            with trio.fail_after(settings.io_timeout):
                adopted = await adopt_handles(ops)
            log.info("taking over", extra=fields(fuse_fd=settings.fuse_fd, handles=adopted))
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            nursery.start_soon(_session, nursery.cancel_scope)
            if taking is not None and not await _take_over(taking, settings.io_timeout):
                nursery.cancel_scope.cancel()
                return 1
            if not await _answers(settings.mountpoint, settings.io_timeout):
                log.error("mount does not answer", extra=fields(mountpoint=settings.mountpoint))
                nursery.cancel_scope.cancel()
                return 1
            kernel.set_read_ahead(settings.mountpoint, int(settings.options["read-ahead-kb"]))
            _signal_ready(settings.ready_fd)
            # after READY: prometheus_client is imported only now, off the start-up path
            sources = ops.stats.sources(ops)
            metrics.serve(settings.metrics_address, *sources)
            if settings.metrics_file:
                nursery.start_soon(metrics.write_every, settings.metrics_file, sources, WRITE_EVERY)
            log.info(
                "mounted", extra=fields(mountpoint=settings.mountpoint, fs_path=settings.fs_path)
            )
            async for signum in signals:
                log.info("unmounting", extra=fields(signal=signal.Signals(signum).name))
                break
            if taking is not None:  # a handover: what is not read yet waits for the next daemon
                pyfuse3.terminate()
            with trio.CancelScope(shield=True), trio.move_on_after(settings.io_timeout):
                await ops.drain_all()
            pyfuse3.terminate()
    return 0


async def _session(cancel_scope: trio.CancelScope) -> None:
    try:
        await pyfuse3.main(min_tasks=2, max_tasks=MAX_TASKS)
    finally:
        cancel_scope.cancel()  # unmounted (or terminated): stop everything else


async def _take_over(taking: Takeover, seconds: float) -> bool:
    with trio.move_on_after(seconds):
        await taking.attached.wait()
    if not taking.attached.is_set():
        log.error("libfuse did not take the recorded INIT")
        return False
    try:
        taking.resend()
    except OSError as exc:
        log.error("cannot take over the connection", extra=fields(err=str(exc)))
        return False
    return True


async def _answers(mountpoint: str, seconds: float) -> bool:
    with trio.move_on_after(seconds):
        try:
            await trio.to_thread.run_sync(os.stat, mountpoint, abandon_on_cancel=True)
            return True
        except OSError as exc:
            log.error("stat of the new mount failed", extra=fields(err=str(exc)))
            return False
    return False


def _signal_ready(fd: int | None) -> None:
    if fd is not None:
        try:
            os.write(fd, b"READY\n")
        finally:
            os.close(fd)


def _memory_trimmer():
    """A call that hands the heap's free pages back to the kernel (glibc keeps them): the
    daemon runs it when the last file with data I/O closes, so one burst of 2 MiB pieces
    and read-ahead windows does not stay resident, or fragment the next burst upwards."""
    try:
        import ctypes

        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return lambda: None  # not glibc
    return lambda: trim(0)


def run(args) -> int:
    logs.setup("mount", args.log_level)
    try:
        settings = Settings(args)
    except (ValueError, OSError) as exc:
        log.error("bad arguments", extra=fields(err=str(exc)))  # the log is JSON lines only
        return 2
    try:
        base_ino = trio.run(_preflight, settings)
    except Exception as raised:
        exc = errors.unwrap(raised)
        if not isinstance(exc, OSError | trio.TooSlowError):
            raise
        what = "timed out" if isinstance(exc, trio.TooSlowError) else errors.describe(exc)
        log.error(
            "fs-path not usable",
            extra=fields(fs_path=settings.fs_path, master_addrs=settings.master_addrs, err=what),
        )
        return 1
    ops = Operations(None, base_ino, settings.options)
    ops.idle = _memory_trimmer()
    taking = None
    try:
        where = settings.mountpoint
        if settings.fuse_fd is not None:
            taking = Takeover(settings.fuse_fd, settings.connection)
            ops.handles = HandleTable(takeover.handle_store(settings.connection))
            ops.init = taking.attach  # libfuse calls it while processing INIT
            where = taking.mountpoint
        pyfuse3.init(
            ops,
            where,
            kernel.fuse_options(settings.master_addrs, settings.fs_path, settings.options),
        )
    except Exception as exc:
        log.error("mount failed", extra=fields(mountpoint=settings.mountpoint, err=str(exc)))
        return 1
    code = 1
    try:
        code = trio.run(_serve, ops, settings, taking)
    except Exception:
        log.exception("daemon failed")
    finally:
        pyfuse3.close(unmount=True)
        log.info("stopped", extra=fields(known_inodes=len(ops.lookups)))
    return code
