"""Prometheus gauges of mountd's table, read at scrape time."""

from __future__ import annotations

from fusecsi.cluster.protocol import parse_addr


def serve_metrics(address: str, supervisor) -> None:
    from prometheus_client import REGISTRY, start_http_server
    from prometheus_client.core import GaugeMetricFamily

    class TableCollector:
        def collect(self):
            rows = supervisor.list()
            daemons = GaugeMetricFamily(
                "fusecsi_mountd_daemons", "FUSE daemons by state", labels=["state"]
            )
            counts: dict[str, int] = {}
            for row in rows:
                counts[row["state"]] = counts.get(row["state"], 0) + 1
            for state, count in counts.items():
                daemons.add_metric([state], count)
            refs = GaugeMetricFamily("fusecsi_mountd_references", "published targets")
            refs.add_metric([], sum(len(row["refs"]) for row in rows))
            restarts = GaugeMetricFamily(
                "fusecsi_mountd_daemon_restarts", "recoveries per key", labels=["key"]
            )
            for row in rows:
                restarts.add_metric([row["key"]], row["restarts"])
            yield from (daemons, refs, restarts)

    REGISTRY.register(TableCollector())
    host, port = parse_addr(address, 0)
    start_http_server(port, addr=host)
