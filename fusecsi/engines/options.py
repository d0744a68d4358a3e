"""FUSE mount options as every engine takes them: `k=v,...` text, and its canonical form.

One rule for all engines: a StorageClass parameter that is neither fusecsi's own nor one of
the engine's `cluster_parameters` is a mount option of that engine, and so is a `k=v` mount
flag (a PV's or StorageClass's mountOptions). The controller checks them at CreateVolume
(a typo is refused there, not at the first pod), the node plugin adds the mount flags, and
mountd keys its daemons by the canonical form, so two spellings share one daemon.
"""

from __future__ import annotations

from collections.abc import Mapping

from fusecsi.engines.base import NodeEngine


def parse_options(text: str) -> dict[str, str]:
    """`k=v,k=v` as a mapping (ValueError on an item without `=`)."""
    raw: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"mount option {item!r} needs a value (key=value)")
        raw[name.strip()] = value.strip()
    return raw


def canonical_options(engine: NodeEngine, options: str | Mapping[str, str]) -> str:
    """The engine's canonical `k=v,...` form (ValueError/BadParameter when an option is off
    the engine's allow-list)."""
    parsed = parse_options(options) if isinstance(options, str) else dict(options)
    normalize = getattr(engine, "normalize_options", None)
    if normalize is not None:
        return normalize(parsed)
    engine.check_options(parsed)
    return ",".join(f"{k}={v}" for k, v in sorted(parsed.items()))


def split_parameters(
    engine: NodeEngine, parameters: Mapping[str, str]
) -> tuple[dict[str, str], str]:
    """An engine's StorageClass parameters (fusecsi's own taken out already) as (what names
    the cluster, the canonical mount options)."""
    names = set(engine.cluster_parameters)
    cluster = {k: v for k, v in parameters.items() if k in names}
    options = {k: v for k, v in parameters.items() if k not in names}
    return cluster, canonical_options(engine, options)
