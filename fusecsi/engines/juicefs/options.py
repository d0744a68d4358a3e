"""The `juicefs mount` options a StorageClass may set (an allow-list: anything else, e.g.
--cache-dir on a node path or --subdir, is refused). Values are checked against a pattern
and passed as one `--name=value` argument, so no value can smuggle in another flag."""

from __future__ import annotations

import re
from collections.abc import Mapping

from fusecsi.engines.base import BadParameter

_DURATION = re.compile(r"^\d+(\.\d+)?(ms|s|m|h)?$")
_SIZE = re.compile(r"^\d+(\.\d+)?([KMGT]i?B?)?$", re.IGNORECASE)
_INT = re.compile(r"^\d{1,9}$")
_BOOL = {"true": True, "1": True, "yes": True, "on": True, "": True}
_BOOL |= {"false": False, "0": False, "no": False, "off": False}

# name -> (kind, what it is); kinds: flag, duration, size, int, or a set of words
OPTIONS: dict[str, tuple[object, str]] = {
    "writeback": ("flag", "upload blocks in the background (faster, may lose data on a crash)"),
    "read-only": ("flag", "serve the mount read-only"),
    "cache-partial-only": ("flag", "cache only small and random reads"),
    "readdir-cache": ("flag", "let the kernel cache directory listings"),
    "attr-cache": ("duration", "how long the kernel caches attributes"),
    "entry-cache": ("duration", "how long the kernel caches file lookups"),
    "dir-entry-cache": ("duration", "how long the kernel caches directory lookups"),
    "negative-entry-cache": ("duration", "how long the kernel caches failed lookups"),
    "open-cache": ("duration", "how long an open file's attributes are reused"),
    "backup-meta": ("duration", "metadata backup interval (0: none from this client)"),
    "heartbeat": ("duration", "session heartbeat interval"),
    "buffer-size": ("size", "read/write buffer (MiB unless a unit is given)"),
    "cache-size": ("size", "local read cache size (MiB unless a unit is given)"),
    "free-space-ratio": ("ratio", "minimum free space kept on the cache disk"),
    "max-readahead": ("size", "read-ahead per read session"),
    "prefetch": ("int", "blocks prefetched in parallel"),
    "max-uploads": ("int", "parallel uploads"),
    "max-downloads": ("int", "parallel downloads"),
    "upload-limit": ("int", "upload bandwidth limit in Mbps"),
    "download-limit": ("int", "download bandwidth limit in Mbps"),
    "atime-mode": ({"noatime", "relatime", "strictatime"}, "when to update atime"),
}


def _valid(kind: object, value: str) -> bool:
    if kind == "flag":
        return value.strip().lower() in _BOOL
    if kind == "duration":
        return bool(_DURATION.match(value))
    if kind == "size":
        return bool(_SIZE.match(value))
    if kind == "int":
        return bool(_INT.match(value))
    if kind == "ratio":
        try:
            return 0 <= float(value) < 1
        except ValueError:
            return False
    return isinstance(kind, set) and value in kind


def check(options: Mapping[str, str]) -> None:
    for name, value in options.items():
        spec = OPTIONS.get(name)
        if spec is None:
            allowed = ", ".join(sorted(OPTIONS))
            raise BadParameter(f"juicefs mount option {name!r} is not allowed (allowed: {allowed})")
        if not _valid(spec[0], str(value)):
            raise BadParameter(f"juicefs mount option {name}={value!r} is not valid ({spec[1]})")


def arguments(options: Mapping[str, str]) -> list[str]:
    """The checked options as `juicefs mount` arguments, in a stable order."""
    check(options)
    args = []
    for name in sorted(options):
        value = str(options[name])
        if OPTIONS[name][0] == "flag":
            if _BOOL[value.strip().lower()]:
                args.append(f"--{name}")
        else:
            args.append(f"--{name}={value}")
    return args
