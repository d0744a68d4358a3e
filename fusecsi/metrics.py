"""Prometheus metrics: the one HTTP endpoint every role serves, and the plain counters they keep.

Counting happens in plain Python (`Tally`, `Distribution`: a dict update per event, no locks,
no prometheus_client objects), so hot paths such as FUSE requests and cluster RPCs stay
cheap; the numbers become metric families only when someone scrapes or a file is written.
prometheus_client itself is imported only when metrics are switched on, which keeps the FUSE
daemon's start-up lean.

Many FUSE daemons on one node would need one port each, so a daemon writes its families to a
file instead (`write_file`), and mountd re-exports every daemon's file with a `key` label
(`FileFamilies`): one scrape target per node.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Callable, Iterable, Sequence

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
)  # fmt: skip


def add_flag(parser) -> None:
    parser.add_argument(
        "--metrics-address",
        default=None,
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (off when not given)",
    )


def split_address(address: str) -> tuple[str, int]:
    """`HOST:PORT` / `[v6]:PORT` / `:PORT` -> (host, port); ValueError otherwise."""
    host, sep, port = address.strip().rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"metrics address {address!r} is not HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


class Tally:
    """A counter by label values, kept in a dict."""

    def __init__(self, name: str, documentation: str, labels: Sequence[str] = ()) -> None:
        self.name, self.documentation, self.labels = name, documentation, tuple(labels)
        self.counts: dict[tuple, float] = {}

    def add(self, *values, amount: float = 1) -> None:
        self.counts[values] = self.counts.get(values, 0) + amount

    def value(self, *values) -> float:
        return self.counts.get(values, 0)

    def families(self):
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        for values, count in list(self.counts.items()):
            family.add_metric([str(v) for v in values], count)
        yield family


class Distribution:
    """A histogram by label values: per-bucket counts and a sum in plain lists."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ) -> None:
        self.name, self.documentation, self.labels = name, documentation, tuple(labels)
        self.bounds = tuple(float(b) for b in buckets)
        self.series: dict[tuple, list[float]] = {}  # counts per bucket, then +Inf, then sum

    def observe(self, value: float, *values) -> None:
        series = self.series.get(values)
        if series is None:
            series = self.series[values] = [0] * (len(self.bounds) + 2)
        series[bisect.bisect_left(self.bounds, value)] += 1
        series[-1] += value

    def count(self, *values) -> int:
        series = self.series.get(values)
        return int(sum(series[:-1])) if series else 0

    def families(self):
        from prometheus_client.core import HistogramMetricFamily

        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labels)
        names = [*(repr(b) for b in self.bounds), "+Inf"]
        for values, series in list(self.series.items()):
            running, buckets = 0, []
            for name, count in zip(names, series[:-1], strict=True):
                running += count
                buckets.append((name, running))
            family.add_metric([str(v) for v in values], buckets, series[-1])
        yield family


class Gauges:
    """A gauge whose samples `read()` returns at scrape time: [(label values, number)]."""

    def __init__(
        self,
        name: str,
        documentation: str,
        read: Callable[[], Iterable[tuple[Sequence, float]]],
        labels: Sequence[str] = (),
    ) -> None:
        self.name, self.documentation, self.labels, self.read = name, documentation, labels, read

    def families(self):
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily(self.name, self.documentation, labels=self.labels)
        for values, number in self.read():
            family.add_metric([str(v) for v in values], number)
        yield family


def gauge(name: str, documentation: str, read: Callable[[], float]) -> Gauges:
    """An unlabelled gauge."""
    return Gauges(name, documentation, lambda: [((), read())])


class _Collector:
    def __init__(self, sources) -> None:
        self.sources = list(sources)

    def collect(self):
        for source in self.sources:
            yield from source.families()


def register(*sources, registry=None) -> None:
    """Export `sources` (objects with `families()`) from `registry` (default: the global one)."""
    from prometheus_client import REGISTRY

    (registry or REGISTRY).register(_Collector(sources))


def serve(address: str | None, *sources) -> int | None:
    """Serve the global registry plus `sources` at `address` on a thread of prometheus_client's
    own; does nothing when `address` is None. Returns the port."""
    if not address:
        return None
    from prometheus_client import start_http_server

    host, port = split_address(address)
    if sources:
        register(*sources)
    server, _ = start_http_server(port, addr=host)
    return server.server_port


# ------------------------------------------------------------------ CSI calls

CSI_CALLS = Tally("fusecsi_csi_calls_total", "CSI calls served", ["method", "code"])
CSI_SECONDS = Distribution(
    "fusecsi_csi_call_seconds", "CSI call latency, by method and status code", ["method", "code"]
)


def observe_csi(server) -> None:
    """Count every call a `CsiServer` finishes, by method and gRPC code."""

    def observe(method: str, status, seconds: float) -> None:
        CSI_CALLS.add(method, status.name)
        CSI_SECONDS.observe(seconds, method, status.name)

    server.observers.append(observe)


def serve_csi(server, address: str | None, *sources) -> int | None:
    """Metrics for a CSI role (controller, node): the call counters plus `sources`."""
    if not address:
        return None
    observe_csi(server)
    return serve(address, CSI_CALLS, CSI_SECONDS, *sources)


# ------------------------------------------------------------------ per-daemon files


def render(*sources) -> bytes:
    """`sources` in the text exposition format."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    register(*sources, registry=registry)
    return generate_latest(registry)


def write_file(path: str, data: bytes) -> None:
    """Replace `path` with `data` atomically: a reader sees the old file or the new one."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


async def write_every(path: str, sources, interval: float = 5.0) -> None:
    """Rewrite `path` from `sources` every `interval` seconds until cancelled. The families
    are built here, on the loop that updates the counters; only the file write is threaded."""
    import trio

    while True:
        data = render(*sources)
        try:
            await trio.to_thread.run_sync(write_file, path, data)
        except OSError:
            pass  # mountd removed the directory, or the disk is full: try again next time
        await trio.sleep(interval)


class FileFamilies:
    """Families read from `<directory>/<name>.prom` files, re-exported with a `label`=<name>
    label; `names()` says which files count (others are stale leftovers)."""

    def __init__(self, directory: str, label: str, names: Callable[[], Iterable[str]]) -> None:
        self.directory, self.label, self.names = directory, label, names

    def families(self):
        from prometheus_client.metrics_core import Metric
        from prometheus_client.parser import text_string_to_metric_families
        from prometheus_client.samples import Sample

        merged: dict[str, Metric] = {}
        for name in sorted(self.names()):
            try:
                with open(os.path.join(self.directory, f"{name}.prom")) as f:
                    text = f.read()
                parsed = list(text_string_to_metric_families(text))
            except (OSError, ValueError):
                continue  # not written yet, or gone with its daemon
            for family in parsed:
                into = merged.get(family.name)
                if into is None:
                    into = merged[family.name] = Metric(
                        family.name, family.documentation, family.type, family.unit
                    )
                for s in family.samples:
                    labels = {**s.labels, self.label: name}
                    into.samples.append(Sample(s.name, labels, s.value, s.timestamp, s.exemplar))
        yield from merged.values()
