"""JuiceFS directory quotas through `juicefs quota` (JuiceFS >= 1.1; no mount needed).

`quota set --capacity <n>B` sets the limit to the byte. `quota get` prints it only rounded
(go-humanize's IBytes: "1.5 GiB"), so the exact value is read back with the help of a record
the caller keeps (see namespace.py): `displayed(n)` says how JuiceFS shows `n`, and a record
that shows the same is the limit JuiceFS enforces.
"""

from __future__ import annotations

import math

from fusecsi.engines.juicefs.commands import run
from fusecsi.engines.juicefs.metaurl import MetaURL

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def displayed(n: int) -> str:
    """How `juicefs quota` prints a size of `n` bytes."""
    if n < 10:
        return f"{n} B"
    exponent = min(int(math.floor(math.log(n) / math.log(1024))), len(_UNITS) - 1)
    value = math.floor(n / 1024**exponent * 10 + 0.5) / 10
    return f"{value:.1f} {_UNITS[exponent]}" if value < 10 else f"{value:.0f} {_UNITS[exponent]}"


def parse_displayed(text: str) -> int:
    """The (approximate) bytes of a printed size."""
    number, _, unit = text.strip().partition(" ")
    return int(float(number) * 1024 ** _UNITS.index(unit.strip()))


async def set_limit(meta: MetaURL, path: str, max_bytes: int, *, seconds: float) -> None:
    await run(
        meta,
        ["quota", "set", meta.public, "--path", path, "--capacity", f"{max_bytes}B"],
        seconds=seconds,
    )


async def get_limit(meta: MetaURL, path: str, *, seconds: float) -> str | None:
    """The byte limit of `path` as `juicefs quota` prints it; None when it has none."""
    out = await run(meta, ["quota", "get", meta.public, "--path", path], seconds=seconds)
    rows = [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in out.splitlines()
        if line.startswith("|")
    ]
    data = [row for row in rows[1:] if len(row) >= 2]  # rows[0] is the header
    if not data:
        return None
    size = data[0][1]
    return None if size in ("unchanged", "") else size
