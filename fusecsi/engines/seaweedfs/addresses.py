"""How a StorageClass names a SeaweedFS cluster, and the address string that records it.

`filer-addrs` (required) lists filers as SeaweedFS writes them: `host:port` (the filer's
gRPC port is then port+10000, SeaweedFS's convention) or `host:port.grpcport`.
`master-addrs` (optional, same forms) is only used for free capacity: the filer's HTTP API
does not report it. The address (the cluster's name in volume ids and sharing keys) is the
filers alone: masters do not name the cluster, and every byte of the address is a byte less
for the directory name in a 128-byte volume id. Cluster has no field for what does not name
the cluster, so the masters travel in `Cluster.secrets` under `master-addrs` (not a secret;
there it is simply never logged, and not part of the cluster's identity).

Other keys are left alone: the node hands over the whole volume context (fs-path, subpath,
pod info, ...), so a key this engine does not know is not an error here.

Secrets (CSI secret, never argv or logs): `jwt-filer-signing-key` and
`jwt-filer-signing-read-key`, the filer's `jwt.filer_signing[.read]` keys, needed only by
the controller (its HTTP calls); `weed mount` talks gRPC, which those keys do not guard.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from fusecsi.engines.base import BadParameter, Cluster

ENGINE = "seaweedfs"
SECRET_KEYS = ("jwt-filer-signing-key", "jwt-filer-signing-read-key")
MASTERS_KEY = "master-addrs"
_ADDRESS = re.compile(
    r"^(?P<host>[A-Za-z0-9][A-Za-z0-9.-]*|\[[0-9A-Fa-f:.]+\]):(?P<port>\d{1,5})(?:\.(?P<grpc>\d{1,5}))?$"
)


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int  # HTTP
    grpc_port: int | None = None

    def __str__(self) -> str:
        text = f"{self.host}:{self.port}"
        return f"{text}.{self.grpc_port}" if self.grpc_port else text

    @property
    def http(self) -> tuple[str, int]:
        return self.host.strip("[]"), self.port


def parse_endpoints(text: str, what: str) -> list[Endpoint]:
    endpoints = []
    for item in (part.strip() for part in text.split(",")):
        match = _ADDRESS.match(item)
        ports = [int(p) for p in (match.group("port"), match.group("grpc")) if p] if match else []
        if not match or not all(0 < port < 65536 for port in ports):
            raise BadParameter(
                f"seaweedfs: {what}: {item!r} is not host:port or host:port.grpcport"
            )
        endpoints.append(Endpoint(match.group("host"), *ports))
    return endpoints


def parse_cluster(parameters: Mapping[str, str], secrets: Mapping[str, str]) -> Cluster:
    filers_text = parameters.get("filer-addrs", "").strip()
    if not filers_text:
        raise BadParameter(
            "seaweedfs: StorageClass parameter filer-addrs is required (host:port,...)"
        )
    filers = parse_endpoints(filers_text, "filer-addrs")
    address = ",".join(map(str, filers))
    kept = {key: secrets[key] for key in SECRET_KEYS if secrets.get(key)}
    masters_text = parameters.get(MASTERS_KEY, "").strip()
    if masters_text:
        kept[MASTERS_KEY] = ",".join(map(str, parse_endpoints(masters_text, MASTERS_KEY)))
    return Cluster(ENGINE, address, kept)


def filers_of(cluster: Cluster) -> list[Endpoint]:
    return parse_endpoints(cluster.address, "filer-addrs")


def masters_of(cluster: Cluster) -> list[Endpoint]:
    text = cluster.secrets.get(MASTERS_KEY, "")
    return parse_endpoints(text, MASTERS_KEY) if text else []
