"""Run every benchmark in this directory, then draw one PNG chart per result file.

    python benchmarks/run_all.py            # full runs (minutes each)
    python benchmarks/run_all.py --quick    # short smoke runs
    python benchmarks/run_all.py --charts-only

Each benchmark script prints its own table and writes benchmarks/results/<name>.json
(results/quick/<name>.json with --quick: a smoke run never replaces committed numbers);
this runner only sequences them and turns each JSON file into a PNG beside it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import _results  # noqa: E402 - benchmarks/ is on sys.path when run

HERE = Path(__file__).resolve().parent


def scripts() -> list[Path]:
    return sorted(
        p for p in HERE.glob("*.py") if p.name != Path(__file__).name and not p.name.startswith("_")
    )


# setup facts, sample counts and the spread around a median are not what a chart shows
SKIP = {"min", "max", "mean", "n", "target", "unit", "setup", "machine", "params", "config"}


def numeric_leaves(value, path=()):
    """(path, number) for every number in a JSON document, skipping raw sample lists."""
    if isinstance(value, bool):
        return
    if isinstance(value, int | float):
        yield path, float(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from numeric_leaves(item, (*path, str(key)))
    elif isinstance(value, list) and not all(isinstance(v, int | float) for v in value):
        for index, item in enumerate(value):
            label = item.get("name") or item.get("test") if isinstance(item, dict) else None
            yield from numeric_leaves(item, (*path, str(label or index)))


def chart(result: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(result.read_text())
    # the summary (or results) section; medians stand for their min/median/max triples
    section = data.get("summary") or data.get("results") or data
    leaves = [
        ("/".join(p[:-1] if p[-1] == "median" else p), v)
        for p, v in numeric_leaves(section)
        if p and not set(p) & SKIP
    ][:40]
    fig, ax = plt.subplots(figsize=(10, max(3, 0.3 * len(leaves) + 1)))
    ax.barh([k for k, _ in leaves], [v for _, v in leaves], color="#3b7dd8")
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_title(f"{result.stem}: medians, log scale (units and spread in the JSON)")
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    out = result.with_suffix(".png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short smoke runs")
    parser.add_argument("--charts-only", action="store_true", help="only redraw the charts")
    parser.add_argument("only", nargs="*", help="benchmark names to run (default: all)")
    args = parser.parse_args()
    failed = []
    if not args.charts_only:
        for script in scripts():
            if args.only and script.stem not in args.only:
                continue
            print(f"==> {script.name}", flush=True)
            started = time.monotonic()
            command = [sys.executable, str(script), *(["--quick"] if args.quick else [])]
            if subprocess.run(command, check=False).returncode != 0:
                failed.append(script.name)
            print(f"    {script.name} took {time.monotonic() - started:.0f}s", flush=True)
    for result in sorted(_results.directory(args.quick).glob("*.json")):
        print(f"chart: {chart(result)}")
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
