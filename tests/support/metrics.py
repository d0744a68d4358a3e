"""Clusters that serve /metrics, and scraping it (the observability tests)."""

from __future__ import annotations

import contextlib
import time
import urllib.request
from pathlib import Path

import trio

from fusecsi.cluster.local import LocalCluster, free_port


@contextlib.contextmanager
def metered_cluster(base: Path):
    """A master and one worker that serve /metrics: their ports are the cluster's
    `metrics_port` and `worker_metrics_port`."""
    port, worker_port = free_port(), free_port()
    with LocalCluster(
        base,
        workers=1,
        master_args=("--metrics-address", f"127.0.0.1:{port}"),
        worker_args=("--metrics-address", f"127.0.0.1:{worker_port}"),
    ) as cluster:
        cluster.metrics_port, cluster.worker_metrics_port = port, worker_port
        yield cluster


def scrape(port: int) -> dict[str, float]:
    """`name{labels}` -> value of every sample the endpoint serves (labels sorted, as
    prometheus_client writes them)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def sample(samples: dict[str, float], name: str, **labels: str) -> float:
    """One sample's value; 0 when it is not there (a counter nobody has touched yet)."""
    if labels:
        inside = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        name = f"{name}{{{inside}}}"
    return samples.get(name, 0.0)


def matching(samples: dict[str, float], name: str, **labels: str) -> float:
    """The sum of the samples of `name` that carry at least `labels`."""
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(
        value
        for key, value in samples.items()
        if key.split("{")[0] == name and all(w in key for w in wanted)
    )


async def poll(check, *, deadline: float, what: str):
    """Run `check()` in a thread until it returns a truthy value."""
    end = time.monotonic() + deadline
    last = None
    while time.monotonic() < end:
        last = await trio.to_thread.run_sync(check)
        if last:
            return last
        await trio.sleep(0.1)
    raise AssertionError(f"{what}: not within {deadline}s (last: {last!r})")
