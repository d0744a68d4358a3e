"""How a StorageClass names a SeaweedFS cluster, and the address string that records it.

`filer-addrs` (required) lists filers as SeaweedFS writes them: `host:port` (the filer's
gRPC port is then port+10000, SeaweedFS's convention) or `host:port.grpcport`.
`master-addrs` (optional, same forms) is only used for free capacity: the filer's HTTP API
does not report it. The recorded address is `filers` or `filers;masters=masters`.

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
    masters_text = parameters.get("master-addrs", "").strip()
    if masters_text:
        address += ";masters=" + ",".join(map(str, parse_endpoints(masters_text, "master-addrs")))
    kept = {key: secrets[key] for key in SECRET_KEYS if secrets.get(key)}
    return Cluster(ENGINE, address, kept)


def split_address(address: str) -> tuple[list[Endpoint], list[Endpoint]]:
    """(filers, masters) of a recorded address."""
    filers_text, _, rest = address.partition(";")
    masters: list[Endpoint] = []
    if rest:
        if not rest.startswith("masters="):
            raise BadParameter(f"seaweedfs: malformed cluster address {address!r}")
        masters = parse_endpoints(rest.removeprefix("masters="), "master-addrs")
    return parse_endpoints(filers_text, "filer-addrs"), masters
