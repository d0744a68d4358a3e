"""Where a benchmark's JSON goes: results/<name>.json for a full run (committed numbers),
results/quick/<name>.json for a --quick smoke run (not committed), so a smoke run never
replaces measured numbers."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def directory(quick: bool) -> Path:
    return RESULTS / "quick" if quick else RESULTS


def write(name: str, quick: bool, document: dict, indent: int = 1) -> Path:
    out = directory(quick) / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=indent) + "\n")
    print(f"wrote {out}")
    return out
