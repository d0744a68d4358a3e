"""`fusecsi master`: the cluster's namespace, quotas, placement and worker registry."""

from __future__ import annotations

import logging
import os
import signal
import uuid
from pathlib import Path

import msgpack
import trio

from fusecsi.cluster import roles
from fusecsi.cluster.master.journal import Journal, fsync_dir
from fusecsi.cluster.master.namespace import Namespace
from fusecsi.cluster.master.service import MasterService
from fusecsi.logs import fields
from fusecsi.metrics import gauge
from fusecsi.rpc.framing import DEFAULT_MAX_FRAME
from fusecsi.rpc.pool import Pool
from fusecsi.rpc.server import Server

log = logging.getLogger("fusecsi.master")

DEFAULT_PORT = 8995
WORKER_PORT = 8997
DEFAULT_BLOCK_SIZE = 16 << 20


def configure(parser) -> None:
    roles.add_common_flags(parser, f"0.0.0.0:{DEFAULT_PORT}")
    parser.add_argument("--replication", type=int, default=1, help="copies of every block")
    parser.add_argument(
        "--block-size",
        type=int,
        default=DEFAULT_BLOCK_SIZE,
        help="bytes per block (fixed when the cluster is first created)",
    )
    parser.add_argument(
        "--checkpoint-records", type=int, default=200_000, help="checkpoint after this many records"
    )


def cluster_meta(data_dir: Path, wanted_block_size: int) -> dict:
    """The cluster's fixed facts, written when the data dir is first formatted: the block
    size and the cluster id that workers and clients check (a master with another id holds
    another namespace). A meta file from before cluster ids gets one now."""
    meta = data_dir / "cluster.meta"
    stored = msgpack.unpackb(meta.read_bytes()) if meta.exists() else {}
    if stored.get("block_size", wanted_block_size) != wanted_block_size:
        log.warning(
            "keeping the cluster's block size",
            extra=fields(stored=stored["block_size"], requested=wanted_block_size),
        )
    if "block_size" in stored and "cluster_id" in stored:
        return stored
    stored = {"block_size": wanted_block_size, **stored, "cluster_id": str(uuid.uuid4())}
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = data_dir / "cluster.meta.tmp"
    with open(tmp, "wb") as f:
        f.write(msgpack.packb(stored))
        f.flush()
        os.fsync(f.fileno())
    tmp.rename(meta)
    fsync_dir(data_dir)
    log.info("cluster id recorded", extra=fields(cluster_id=stored["cluster_id"]))
    return stored


def load_namespace(journal: Journal, block_size: int) -> tuple[Namespace, int]:
    state, records = journal.recover()
    ns = Namespace.load(state) if state is not None else Namespace(block_size)
    for record in records:
        ns.apply(record)
    return ns, len(records)


async def serve(args, token: str | None) -> None:
    data_dir = Path(args.data_dir)
    meta = cluster_meta(data_dir, args.block_size)
    journal = Journal(data_dir)
    ns, replayed = load_namespace(journal, meta["block_size"])
    log.info(
        "namespace loaded",
        extra=fields(
            inodes=len(ns.inodes),
            replayed=replayed,
            next_id=ns.next_id,
            cluster_id=meta["cluster_id"],
        ),
    )
    sock = await roles.bind(args.listen, DEFAULT_PORT)
    max_frame = max(DEFAULT_MAX_FRAME, 2 * ns.block_size + (1 << 20))
    try:
        async with trio.open_nursery() as nursery:
            pool = Pool(
                nursery, token=token, default_port=WORKER_PORT, timeout=10, max_frame=max_frame
            )
            service = MasterService(
                ns,
                journal,
                pool,
                replication=max(1, args.replication),
                cluster_id=meta["cluster_id"],
                checkpoint_records=max(1, args.checkpoint_records),
            )
            await nursery.start(journal.run)
            await nursery.start(service.run)
            if replayed:
                await service.checkpoint()
            server = Server(service.handlers(), token=token, max_frame=max_frame, name="master")
            roles.serve_metrics(
                args.metrics_address,
                server,
                journal.fsync_seconds,
                journal.group_size,
                gauge("fusecsi_master_inodes", "inodes in the namespace", lambda: len(ns.inodes)),
                gauge(
                    "fusecsi_master_live_workers",
                    "workers heard from recently",
                    lambda: len(service.live_workers()),
                ),
                gauge(
                    "fusecsi_master_journal_records",
                    "records in the current journal segment",
                    lambda: journal.records_in_segment,
                ),
                gauge(
                    "fusecsi_master_journal_unsynced_records",
                    "records acknowledged (written) but not yet fdatasync'd",
                    lambda: journal.written - journal.synced,
                ),
            )
            address = await nursery.start(server.serve, sock)
            log.info("master listening", extra=fields(address=f"{address[0]}:{address[1]}"))
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    log.info("stopping", extra=fields(signal=signum))
                    break
            nursery.cancel_scope.cancel()
    finally:
        journal.close()


def run(args) -> int:
    return roles.run_role("master", args, serve)
