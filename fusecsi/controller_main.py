"""`fusecsi controller`: CSI Identity + Controller on a unix socket."""

from __future__ import annotations

import os

import trio

from fusecsi import logs
from fusecsi.csi_server import CsiServer, add_server_flags, run_until_signal
from fusecsi.identity import IdentityService


def configure(parser) -> None:
    add_server_flags(parser, "unix:///csi/csi.sock")
    parser.add_argument(
        "--token-file",
        default=None,
        help="cluster token for requests without a `token` secret (else $FUSECSI_TOKEN)",
    )
    parser.add_argument(
        "--kubeconfig",
        default=None,
        help="kubeconfig for reading PVC labels/annotations (else $KUBECONFIG, else in-cluster)",
    )
    parser.add_argument(
        "--cluster-timeout",
        type=float,
        default=10.0,
        help="seconds any one cluster call may take before the RPC answers UNAVAILABLE",
    )


def default_token(args) -> str | None:
    if args.token_file:
        with open(args.token_file) as f:
            return f.read().strip() or None
    return os.environ.get("FUSECSI_TOKEN") or None


def serve_metrics(server: CsiServer, address: str) -> None:
    """Prometheus metrics over HTTP (a thread of prometheus_client's own)."""
    import prometheus_client

    host, _, port = address.rpartition(":")
    calls = prometheus_client.Histogram(
        "fusecsi_csi_call_seconds",
        "CSI calls served, by method and status code",
        ["method", "code"],
        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    )
    server.observers.append(lambda method, status, s: calls.labels(method, status.name).observe(s))
    prometheus_client.start_http_server(int(port), addr=host or "0.0.0.0")


async def serve(args) -> None:
    from fusecsi.controller import ClusterClients, ControllerService
    from fusecsi.k8s import KubeApi

    # the client gives up a little before our deadline, so its clearer error wins
    clients = ClusterClients(timeout=args.cluster_timeout * 0.8)
    async with trio.open_nursery() as nursery:
        await nursery.start(clients.run)
        controller = ControllerService(
            clients,
            KubeApi(args.kubeconfig, timeout=args.cluster_timeout),
            default_token=default_token(args),
            call_timeout=args.cluster_timeout,
        )
        server = CsiServer({"Identity": IdentityService(controller=True), "Controller": controller})
        if args.metrics_address:
            serve_metrics(server, args.metrics_address)
        await run_until_signal(server, args.endpoint, args.grace)
        nursery.cancel_scope.cancel()  # closes every cluster client


def run(args) -> int:
    logs.setup("controller", args.log_level)
    trio.run(serve, args)
    return 0
