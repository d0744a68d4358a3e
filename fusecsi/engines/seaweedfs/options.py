"""The `weed mount` flags a StorageClass may set (its `mount-options`), by their own names.

Left out on purpose: what fusecsi owns (-filer, -filer.path, -dir, -localSocket, -cacheDir),
what opens ports or writes profiles (-debug*, -peer.*, -cpuprofile, -memprofile), what
deletes data behind the user's back (-ttl), and -nonempty / -dirAutoCreate (mountd owns
the mountpoint).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from fusecsi.engines.base import BadParameter


def _bool(text: str) -> str:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return "true"
    if lowered in ("false", "0", "no", "off"):
        return "false"
    raise ValueError("expected true or false")


def _int(low: int, high: int) -> Callable[[str], str]:
    def parse(text: str) -> str:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            raise ValueError(f"expected an integer between {low} and {high}")
        return str(value)

    return parse


def _pattern(regex: str, doc: str) -> Callable[[str], str]:
    compiled = re.compile(regex)

    def parse(text: str) -> str:
        if not compiled.fullmatch(text):
            raise ValueError(f"expected {doc}")
        return text

    return parse


_NAME = _pattern(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", "a name of letters, digits, _ . -")

OPTIONS: dict[str, Callable[[str], str]] = {
    "readOnly": _bool,
    "allowOthers": _bool,
    "defaultPermissions": _bool,
    "writebackCache": _bool,
    "asyncDio": _bool,
    "cacheCapacityMB": _int(0, 1 << 20),
    "cacheMetaTtlSec": _int(0, 3600),
    "chunkSizeLimitMB": _int(1, 1024),
    "concurrentWriters": _int(1, 4096),
    "concurrentReaders": _int(1, 4096),
    "writeBufferSizeMB": _int(0, 1 << 20),
    "memoryLimitMB": _int(0, 1 << 20),
    "collectionQuotaMB": _int(0, 1 << 40),
    "umask": _pattern(r"0?[0-7]{3}", "an octal umask such as 022"),
    "replication": _pattern(r"[0-9]{3}", "three digits such as 001"),
    "collection": _NAME,
    "dataCenter": _NAME,
    "disk": _NAME,
    "volumeServerAccess": _pattern(
        r"direct|publicUrl|filerProxy", "direct, publicUrl or filerProxy"
    ),
}


def normalise(options: Mapping[str, str]) -> dict[str, str]:
    """The options in the form passed to `weed mount`; BadParameter (one line) otherwise."""
    out: dict[str, str] = {}
    for name, value in sorted(options.items()):
        parse = OPTIONS.get(name)
        if parse is None:
            raise BadParameter(
                f"seaweedfs: mount option {name!r} is not allowed (allowed: {', '.join(sorted(OPTIONS))})"
            )
        try:
            out[name] = parse(str(value))
        except ValueError as exc:
            raise BadParameter(f"seaweedfs: mount option {name}={value!r}: {exc}") from None
    return out


def argv(options: Mapping[str, str]) -> list[str]:
    return [f"-{name}={value}" for name, value in normalise(options).items()]
