"""`fusecsi mountd`: the node's mount supervisor; `fusecsi mountd status` prints its table;
`fusecsi mountd roll` hands every daemon (or `--key`'s) over to a daemon of the running
mountd's code (fusecsi/mountd/rolling.py).

SIGTERM/SIGINT stop mountd but never its FUSE daemons: they keep serving the pods, and the
next mountd adopts them from the table in the state dir.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys

import trio

from fusecsi import logs, metrics, unix_socket
from fusecsi.logs import fields

log = logging.getLogger(__name__)

# 30 s absorbs pod churn (a rolling restart or reschedule onto the same node re-publishes
# within seconds) at the price of one idle daemon (~35 MiB) for half a minute.
DEFAULT_LINGER = 30.0


def configure(parser) -> None:
    parser.add_argument(
        "action",
        nargs="?",
        choices=("run", "status", "roll"),
        default="run",
        help="run the supervisor (default), print the table of a running one, or roll its "
        "daemons to its code",
    )
    parser.add_argument("--state-dir", default="/var/lib/fusecsi", metavar="DIR")
    parser.add_argument("--socket", default="unix:///run/fusecsi/mountd.sock", metavar="ENDPOINT")
    parser.add_argument("--kubelet-dir", default="/var/lib/kubelet", metavar="DIR")
    parser.add_argument(
        "--linger",
        type=float,
        default=DEFAULT_LINGER,
        metavar="SECONDS",
        help="keep an unused FUSE daemon this long before stopping it",
    )
    parser.add_argument(
        "--health-interval",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="how often every daemon's mount is checked",
    )
    parser.add_argument(
        "--ready-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long a new FUSE daemon may take to answer",
    )
    parser.add_argument(
        "--probe-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="a statfs or usage read on a mount (or a cluster probe) that takes longer counts "
        "as a failed check",
    )
    parser.add_argument(
        "--kubeconfig",
        default=None,
        metavar="F",
        help="kubeconfig for posting Events on pods (else $KUBECONFIG, else in-cluster; "
        "without any, events are only logged)",
    )
    parser.add_argument(
        "--daemon-cgroup",
        default=None,
        metavar="DIR",
        help="a cgroup v2 directory outside mountd's; each FUSE daemon gets a cgroup of its "
        "own under it and so outlives mountd's container (default: daemons stay in mountd's)",
    )
    metrics.add_flag(parser)
    parser.add_argument(
        "--no-takeover",
        action="store_true",
        help="let daemons mount by themselves: a dead daemon's mount is then replaced and "
        "re-bound, not taken over (off by itself on kernels before 6.9)",
    )
    parser.add_argument(
        "--roll-adopted",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="once serving, hand each adopted daemon started from another build over to a "
        "daemon of this one, one key at a time (engines that can hand over)",
    )
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--json", action="store_true", help="status, roll: print JSON")
    parser.add_argument("--key", default=None, metavar="KEY", help="roll: this key only")
    parser.add_argument(
        "--grace",
        type=float,
        default=None,
        metavar="SECONDS",
        help="roll: how long each daemon may take to leave (default 60)",
    )


def run(args) -> int:
    if args.action == "status":
        from fusecsi.mountd.status import print_status

        return print_status(args.socket, as_json=args.json)
    if args.action == "roll":
        return roll(args.socket, key=args.key, grace=args.grace, as_json=args.json)
    from fusecsi.events import Events
    from fusecsi.fuse import takeover
    from fusecsi.k8s import KubeApi
    from fusecsi.mountd import cgroups
    from fusecsi.mountd.supervisor import Supervisor

    logs.setup("mountd", args.log_level)
    failed: list[BaseException] = []
    try:
        path = unix_socket.endpoint_path(args.socket)
        cgroups.use(args.daemon_cgroup)
        supervisor = Supervisor(
            args.state_dir,
            args.kubelet_dir,
            linger=args.linger,
            health_interval=args.health_interval,
            ready_timeout=args.ready_timeout,
            probe_timeout=args.probe_timeout,
            events=Events(KubeApi(args.kubeconfig), "fusecsi-mountd"),
            daemon_metrics=bool(args.metrics_address),  # files only when someone exports them
            takeover=not args.no_takeover and takeover.supported(),
            roll_adopted=args.roll_adopted,
        )
        supervisor.lock_state_dir()
        trio.run(serve, args, supervisor, path)
    except* (RuntimeError, ValueError, OSError) as group:
        failed.extend(group.exceptions)
    for exc in failed:
        log.error("mountd cannot run", extra=fields(error=str(exc)))
    return 1 if failed else 0


async def serve(args, supervisor, path: str) -> None:
    from fusecsi.mountd import api

    server = api.server(supervisor)
    if args.metrics_address:
        from fusecsi.mountd.metrics import serve_metrics

        serve_metrics(args.metrics_address, supervisor, server)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.run)
            # the socket appears only once the table is reconciled: a caller never
            # reaches a mountd that does not yet know its mounts
            listener = unix_socket.bind(path)
            try:
                await nursery.start(server.serve, listener)
                supervisor.serving.set()
                log.info(
                    "serving",
                    extra=fields(
                        socket=path,
                        state_dir=supervisor.state_dir,
                        kubelet_dir=supervisor.kubelet_dir,
                        daemons=len(supervisor.table.entries),
                    ),
                )
                async for signum in signals:
                    log.info("stopping; FUSE daemons keep running", extra=fields(signal=signum))
                    nursery.cancel_scope.cancel()
                    break
            finally:
                unix_socket.remove(path)


def roll(endpoint: str, *, key: str | None, grace: float | None, as_json: bool) -> int:
    """One line per key (or JSON); exit 1 when a key failed."""
    from fusecsi.mountd.client import MountdClient, RPCError

    try:
        rows = trio.run(lambda: MountdClient(endpoint).roll(key, grace))
    except RPCError as exc:
        print(f"mountd at {endpoint}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(rows, indent=1))
    for row in [] if as_json else rows:
        line = f"{row['key']}  {row['result']}"
        if row.get("old_pid"):
            line += f"  {row['old_pid']} -> {row.get('new_pid') or '-'}"
        print(line + (f": {row['message']}" if row["message"] else ""))
    return 1 if any(row["result"] == "failed" for row in rows) else 0
