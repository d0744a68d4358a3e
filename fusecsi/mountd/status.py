"""`fusecsi mountd status`: the running mountd's keys, daemons and references."""

from __future__ import annotations

import json
import os
import sys

import trio

from fusecsi.mountd.client import MountdClient, RPCError


def format_table(rows: list[dict]) -> str:
    lines = []
    header = ("KEY", "STATE", "PID", "RESTARTS", "REFS", "ENGINE", "CLUSTER", "FS-PATH")
    table = [header]
    for row in rows:
        table.append(
            (
                row["key"],
                row["state"],
                str(row["pid"] or "-"),
                str(row["restarts"]),
                str(len(row["refs"])),
                row["engine"],
                row["cluster"],
                row["fs_path"],
            )
        )
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for r in table:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    for row in rows:
        if row.get("message"):
            lines.append(f"{row['key']}: {row['message']}")
        for ref in row["refs"]:
            mode = "ro" if ref["readonly"] else "rw"
            broken = "" if ref.get("healthy", True) else "  BROKEN"
            lines.append(f"  {row['key']}  {mode}  {ref['volume_id']}  {ref['target']}{broken}")
    return "\n".join(lines)


def print_status(endpoint: str, *, as_json: bool = False) -> int:
    async def fetch():
        return await MountdClient(endpoint).list()

    try:
        rows = trio.run(fetch)
    except RPCError as exc:
        print(f"mountd at {endpoint}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    try:
        print(json.dumps(rows, indent=1) if as_json else format_table(rows), flush=True)
    except BrokenPipeError:
        # the reader stopped early (`| head`): not an error. Point stdout at /dev/null so the
        # interpreter's last flush cannot complain either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
