"""`fusecsi controller`: CSI Identity + Controller on a unix socket."""

from __future__ import annotations

import trio

from fusecsi import gctune, logs, metrics
from fusecsi.csi.identity import IdentityService
from fusecsi.csi.server import CsiServer, add_server_flags, run_until_signal
from fusecsi.tokens import TOKEN_ENV, load_token


def configure(parser) -> None:
    add_server_flags(parser, "unix:///csi/csi.sock")
    parser.add_argument(
        "--token-file",
        default=None,
        help=f"embedded cluster token for requests without a `token` secret (else ${TOKEN_ENV})",
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


def default_secrets(args) -> dict[str, dict[str, str]]:
    """Per engine, the secrets for requests that carry none."""
    token = load_token(args.token_file)
    return {"embedded": {"token": token}} if token else {}


async def serve(args) -> None:
    from fusecsi.csi.controller import service
    from fusecsi.csi.controller.namespace_pool import NamespacePool
    from fusecsi.events import Events
    from fusecsi.k8s import KubeApi

    secrets = default_secrets(args)  # a bad token file fails the start, not a request
    # an engine's own calls give up a little before our deadline, so their clearer error wins
    namespaces = NamespacePool(timeout=args.cluster_timeout * 0.8)
    kube = KubeApi(args.kubeconfig, timeout=args.cluster_timeout)
    events = Events(kube, "fusecsi-controller")
    async with trio.open_nursery() as nursery:
        await nursery.start(namespaces.run)
        await nursery.start(events.run)
        controller = service.ControllerService(
            namespaces,
            kube,
            default_secrets=secrets,
            call_timeout=args.cluster_timeout,
            events=events,
        )
        server = CsiServer({"Identity": IdentityService(controller=True), "Controller": controller})
        metrics.serve_csi(server, args.metrics_address, *service.METRICS)
        gctune.settle()
        await run_until_signal(server, args.endpoint, args.grace)
        nursery.cancel_scope.cancel()  # closes every namespace


def run(args) -> int:
    logs.setup("controller", args.log_level)
    trio.run(serve, args)
    return 0
