"""mountd's metrics: its table read at scrape time, its counters, and every FUSE daemon's
own families re-exported with a `key` label (one scrape target per node, no port per daemon).

Everything here runs on prometheus_client's thread: it only reads the supervisor's state.
"""

from __future__ import annotations

from fusecsi import metrics


def _healthy(rt, target: str) -> bool:
    daemon = rt.daemon if rt is not None else None
    return (
        rt is not None
        and rt.state == "running"
        and daemon is not None
        and daemon.alive
        and target not in rt.broken_targets
    )


def sources(supervisor) -> list:
    def entries():
        return list(supervisor.table.entries.items())

    def daemons():
        counts: dict[str, int] = {}
        for key_id, _ in entries():
            rt = supervisor.key_states.get(key_id)
            state = rt.state if rt is not None else "starting"
            counts[state] = counts.get(state, 0) + 1
        return [((state,), n) for state, n in counts.items()]

    def references():
        return [((key_id,), len(entry.refs)) for key_id, entry in entries()]

    def restarts():
        return [((key_id,), entry.restarts) for key_id, entry in entries()]

    def health() -> dict[str, int]:
        """Each published volume: 1 when every target of it is served, else 0."""
        volumes: dict[str, int] = {}
        for key_id, entry in entries():
            rt = supervisor.key_states.get(key_id)
            for ref in list(entry.refs.values()):
                ok = int(_healthy(rt, ref.target))
                volumes[ref.volume_id] = min(volumes.get(ref.volume_id, 1), ok)
        return volumes

    def broken_targets() -> int:
        return sum(
            not _healthy(supervisor.key_states.get(key_id), target)
            for key_id, entry in entries()
            for target in list(entry.refs)
        )

    return [
        metrics.Gauges("fusecsi_mountd_daemons", "FUSE daemons by state", daemons, ["state"]),
        metrics.Gauges(
            "fusecsi_mountd_references", "published targets per key", references, ["key"]
        ),
        metrics.Gauges(
            "fusecsi_mountd_daemon_restarts", "daemon replacements per key", restarts, ["key"]
        ),
        metrics.Gauges(
            "fusecsi_mountd_volume_healthy",
            "each published volume: 1 healthy, 0 broken",
            lambda: [((v,), ok) for v, ok in health().items()],
            ["volume_id"],
        ),
        metrics.gauge(
            "fusecsi_mountd_broken_targets", "targets whose mount is broken now", broken_targets
        ),
        supervisor.publishes,
        supervisor.unpublishes,
        supervisor.recoveries,
        supervisor.rolls,
        supervisor.recovery_seconds,
        metrics.FileFamilies(
            supervisor.metrics_dir, "key", lambda: [key_id for key_id, _ in entries()]
        ),
    ]


def serve_metrics(address: str, supervisor, server) -> int | None:
    """mountd's endpoint: the sources above plus its control API's calls by method and errno."""
    return metrics.serve(address, server.calls, *sources(supervisor))
