"""The FUSE daemon's metrics: plain counters bumped by the request handlers, turned into
metric families only when the metrics file is written (fusecsi.metrics)."""

from __future__ import annotations

from fusecsi import metrics
from fusecsi.fuse import readahead
from fusecsi.rpc.connection import CALL_SECONDS


class OpStats:
    def __init__(self) -> None:
        self.ops = metrics.Tally(
            "fusecsi_mount_ops_total",
            "FUSE requests by operation and result (OK or the errno name)",
            ["op", "errno"],
        )
        self.read_bytes = metrics.Tally("fusecsi_mount_read_bytes_total", "bytes read")
        self.written_bytes = metrics.Tally("fusecsi_mount_written_bytes_total", "bytes written")
        self.in_flight = 0

    def sources(self, ops) -> list:
        """Everything the daemon exports; `ops` is its Operations object."""
        return [
            self.ops,
            self.read_bytes,
            self.written_bytes,
            metrics.gauge(
                "fusecsi_mount_in_flight", "FUSE requests being served", lambda: self.in_flight
            ),
            readahead.COUNTS,
            metrics.gauge(
                "fusecsi_mount_known_inodes", "inodes the kernel holds", lambda: len(ops.lookups)
            ),
            metrics.gauge(
                "fusecsi_mount_open_files", "open file handles", lambda: len(ops.handles.files)
            ),
            CALL_SECONDS,
        ]
