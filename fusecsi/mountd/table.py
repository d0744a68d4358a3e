"""mountd's table: daemon keys, their references, and its atomic persistence.

A key names one FUSE daemon on the node: (engine, cluster address, fs path, FUSE options),
all in canonical form so spellings of the same thing share a daemon. Secrets are not part
of it: they are kept apart (0600, see publishing.py), and the table holds only their
digest. A reference is one (volume id, target path) bound from that daemon's mount.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import cached_property

from fusecsi import engines, mount_options
from fusecsi.csi import volumes
from fusecsi.engines.options import canonical_options

TABLE_VERSION = 1
# tables written before engines existed hold only the default engine's keys
DEFAULT_ENGINE = engines.DEFAULT


@dataclass(frozen=True)
class Key:
    engine: str
    address: str  # the cluster's public address (Cluster.address): never a secret
    fs_path: str
    options: str  # the engine's canonical `k=v,...` string

    @classmethod
    def normalized(cls, engine, address: str, fs_path: str, options: str) -> Key:
        """ValueError (or the engine's BadParameter) on anything that cannot be normalised."""
        if not isinstance(address, str) or "\0" in address:
            raise ValueError("cluster address must be a string")
        normalize_address = getattr(engine, "normalize_address", None)
        if normalize_address is not None:
            address = normalize_address(address)
        if not address.strip():
            raise ValueError("cluster address is empty")
        canonical = canonical_options(engine, options)
        return cls(engine.name, address.strip(), volumes.normalize_fs_path(fs_path), canonical)

    @cached_property
    def id(self) -> str:
        # `options` is canonical already: digested as given, without parsing, so a table
        # written before an option was retired still loads
        text = f"{self.address}|{self.fs_path}|{mount_options.digest_of(self.options)}"
        if self.engine != DEFAULT_ENGINE:  # embedded ids stay what they were before engines
            text = f"{self.engine}|{text}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_json(self) -> dict:
        return {
            "engine": self.engine,
            "address": self.address,
            "fs_path": self.fs_path,
            "options": self.options,
        }

    @classmethod
    def from_json(cls, data: dict) -> Key:
        if "master_addrs" in data:  # a table from before engines: the embedded cluster
            return cls(DEFAULT_ENGINE, data["master_addrs"], data["fs_path"], data["options"])
        return cls(data["engine"], data["address"], data["fs_path"], data["options"])


@dataclass(frozen=True)
class Ref:
    volume_id: str
    target: str
    subpath: str
    readonly: bool
    # the pod kubelet published for (podInfoOnMount), told about its mount through Events;
    # not part of what makes two publishes of a target the same
    pod_namespace: str | None = field(default=None, compare=False)
    pod_name: str | None = field(default=None, compare=False)


@dataclass
class Entry:
    key: Key
    mountpoint: str
    pid: int | None = None
    restarts: int = 0
    refs: dict[str, Ref] = field(default_factory=dict)  # by target
    # digest of the secrets the daemon runs with (publishing.secrets_digest): a publish
    # with the same digest shares it at once, another one only once it is shown to work
    secrets_digest: str = ""
    # the build (fusecsi/mountd/rolling.py) the daemon was started from; "" when unknown
    # (a table from before builds were recorded): such a daemon counts as another build
    build: str = ""

    def to_json(self) -> dict:
        return {
            "key": self.key.to_json(),
            "secrets_digest": self.secrets_digest,
            "mountpoint": self.mountpoint,
            "pid": self.pid,
            "restarts": self.restarts,
            "build": self.build,
            "refs": [
                {
                    "volume_id": r.volume_id,
                    "target": r.target,
                    "subpath": r.subpath,
                    "readonly": r.readonly,
                    "pod_namespace": r.pod_namespace,
                    "pod_name": r.pod_name,
                }
                for r in self.refs.values()
            ],
        }

    @classmethod
    def from_json(cls, data: dict) -> Entry:
        refs = [Ref(**r) for r in data["refs"]]
        return cls(
            key=Key.from_json(data["key"]),
            secrets_digest=data.get("secrets_digest", ""),
            mountpoint=data["mountpoint"],
            pid=data.get("pid"),
            restarts=data.get("restarts", 0),
            build=data.get("build", ""),
            refs={r.target: r for r in refs},
        )


class Table:
    """Entries by key id plus the target index; the only in-memory truth of mountd."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.entries: dict[str, Entry] = {}

    def by_target(self, target: str) -> tuple[Entry, Ref] | None:
        for entry in self.entries.values():
            ref = entry.refs.get(target)
            if ref is not None:
                return entry, ref
        return None

    def snapshot(self) -> bytes:
        data = {
            "version": TABLE_VERSION,
            "entries": [e.to_json() for e in self.entries.values()],
        }
        # compact on purpose: json's C encoder does not indent, and a node with hundreds of
        # references persists after every change
        return json.dumps(data, separators=(",", ":")).encode()

    def load(self) -> None:
        try:
            with open(self.path, "rb") as f:
                data = json.load(f)
        except FileNotFoundError:
            return
        if data.get("version") != TABLE_VERSION:
            raise ValueError(f"{self.path}: unsupported table version {data.get('version')!r}")
        self.entries = {}
        for item in data["entries"]:
            entry = Entry.from_json(item)
            self.entries[entry.key.id] = entry


def write_atomic(path: str, data: bytes, mode: int = 0o600) -> None:
    """Write, fsync, rename over `path`, fsync the directory: old or new, never half."""
    directory = os.path.dirname(path) or "."
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
