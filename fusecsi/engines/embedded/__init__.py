"""The embedded cluster (fusecsi's own master and workers).

Controller half only, in this branch: `open_namespace`, and of `NODE` just `parse_cluster`
(the node half — launch, probe, usage, options — is written with mountd; merged there).
"""

from __future__ import annotations

from collections.abc import Mapping

from fusecsi.engines.base import BadParameter, Cluster
from fusecsi.engines.embedded.namespace import EmbeddedNamespace

NAME = "embedded"
P_MASTER_ADDRS = "master-addrs"
SECRET_TOKEN = "token"


class _ClusterNames:
    name = NAME

    def parse_cluster(self, parameters: Mapping[str, str], secrets: Mapping[str, str]) -> Cluster:
        """`master-addrs` (normalised) names the cluster; the secret `token`, if any, is
        its cluster token."""
        from fusecsi.volumes import normalize_master_addrs

        text = parameters.get(P_MASTER_ADDRS)
        if text is None:
            raise BadParameter(f"parameter {P_MASTER_ADDRS} is required (host:port[,host:port])")
        try:
            address = normalize_master_addrs(text)
        except ValueError as exc:
            raise BadParameter(str(exc)) from None
        token = secrets.get(SECRET_TOKEN)
        return Cluster(NAME, address, {SECRET_TOKEN: token} if token else {})


NODE = _ClusterNames()


def open_namespace(cluster: Cluster, *, timeout: float) -> EmbeddedNamespace:
    return EmbeddedNamespace(cluster, timeout=timeout)
