"""FUSE mount options: the one allow-list shared by the controller (StorageClass
parameters), mountd (daemon keys) and `fusecsi mount` (its --options flag).

Options are compared in normalised form with defaults filled in, so a StorageClass
that spells out a default shares its FUSE daemon with one that leaves it out.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 3600:
        raise ValueError("expected seconds between 0 and 3600")
    return value


def _positive_int(limit: int):
    def parse(text: str) -> int:
        value = int(text)
        if not 1 <= value <= limit:
            raise ValueError(f"expected an integer between 1 and {limit}")
        return value

    return parse


@dataclass(frozen=True)
class Option:
    parse: Any
    default: Any
    doc: str


OPTIONS: dict[str, Option] = {
    "attr-timeout": Option(_seconds, 1.0, "seconds the kernel caches file attributes"),
    "entry-timeout": Option(_seconds, 1.0, "seconds the kernel caches name lookups"),
    "read-ahead-kb": Option(_positive_int(65536), 1024, "sequential read-ahead window in KiB"),
    "write-buffer-mb": Option(_positive_int(1024), 8, "per-open-file write-back buffer in MiB"),
    "io-timeout": Option(_seconds, 30.0, "seconds before a stuck cluster call fails with EIO"),
    "allow-other": Option(_bool, True, "let every user (not only root) use the mount"),
    "default-permissions": Option(_bool, True, "let the kernel check permission bits"),
    "writeback-cache": Option(
        _bool, False, "kernel write-back cache (faster writes, slower unlink)"
    ),
    "read-only": Option(_bool, False, "serve the whole mount read-only"),
}


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


@dataclass(frozen=True)
class MountOptions:
    values: tuple[tuple[str, Any], ...]

    def __getitem__(self, name: str) -> Any:
        return dict(self.values)[name]

    def as_dict(self) -> dict[str, Any]:
        return dict(self.values)

    def to_arg(self) -> str:
        """Canonical `k=v,k=v` form: every option, sorted, defaults included."""
        return ",".join(f"{k}={_format(v)}" for k, v in self.values)

    def digest(self) -> str:
        return digest_of(self.to_arg())


def parse(raw: Mapping[str, str]) -> MountOptions:
    """Validate options given as strings; ValueError names the offending key."""
    values = {name: opt.default for name, opt in OPTIONS.items()}
    for key, text in raw.items():
        opt = OPTIONS.get(key)
        if opt is None:
            raise ValueError(f"unknown mount option {key!r} (allowed: {', '.join(OPTIONS)})")
        try:
            values[key] = opt.parse(str(text))
        except ValueError as exc:
            raise ValueError(f"mount option {key}={text!r}: {exc}") from None
    return MountOptions(tuple(sorted(values.items())))


def parse_arg(text: str) -> MountOptions:
    """Parse the `k=v,k=v` form (empty string means all defaults)."""
    raw: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"mount option {item!r} needs a value (key=value)")
        raw[key.strip()] = value.strip()
    return parse(raw)


DEFAULTS = parse({})


def digest_of(canonical: str) -> str:
    """The digest of a canonical options string (`to_arg()`), without parsing it: a table
    written before an option was retired still hashes to the same key."""
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]
