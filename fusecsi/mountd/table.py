"""mountd's table: daemon keys, their references, and its atomic persistence.

A key names one FUSE daemon on the node: (master addresses, fs path, FUSE options), all
in canonical form so spellings of the same thing share a daemon. A reference is one
(volume id, target path) bound from that daemon's mount.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import cached_property

from fusecsi import mount_options
from fusecsi.csi import volumes

TABLE_VERSION = 1


@dataclass(frozen=True)
class Key:
    master_addrs: str
    fs_path: str
    options: str  # canonical mount_options string

    @classmethod
    def normalized(cls, master_addrs: str, fs_path: str, options: str) -> Key:
        """ValueError on anything that cannot be normalised."""
        return cls(
            volumes.normalize_master_addrs(master_addrs),
            volumes.normalize_fs_path(fs_path),
            mount_options.parse_arg(options or "").to_arg(),
        )

    @cached_property
    def id(self) -> str:
        # `options` is canonical already: digested without parsing, so a table written
        # before an option was retired still loads
        text = f"{self.master_addrs}|{self.fs_path}|{mount_options.digest_of(self.options)}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]


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

    def to_json(self) -> dict:
        key = self.key
        return {
            "key": {
                "master_addrs": key.master_addrs,
                "fs_path": key.fs_path,
                "options": key.options,
            },
            "mountpoint": self.mountpoint,
            "pid": self.pid,
            "restarts": self.restarts,
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
            key=Key(**data["key"]),
            mountpoint=data["mountpoint"],
            pid=data.get("pid"),
            restarts=data.get("restarts", 0),
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
