"""fusecsi.metrics on its own: the plain counters render as Prometheus families, daemons'
metric files are re-exported with their key (stale and unreadable ones skipped), and bad
addresses are refused."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fusecsi import metrics


def parsed(*sources) -> dict[tuple, float]:
    text = metrics.render(*sources).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_tally_and_distribution_render():
    calls = metrics.Tally("t_calls_total", "calls", ["method", "code"])
    calls.add("get", "OK")
    calls.add("get", "OK")
    calls.add("put", "ENOENT", amount=3)
    seconds = metrics.Distribution("t_seconds", "latency", ["method"], buckets=(0.1, 1))
    for value in (0.05, 0.5, 5):
        seconds.observe(value, "get")
    got = parsed(calls, seconds)
    assert got["t_calls_total", (("code", "OK"), ("method", "get"))] == 2
    assert got["t_calls_total", (("code", "ENOENT"), ("method", "put"))] == 3
    bucket = "t_seconds_bucket"
    buckets = {le: got[bucket, (("le", le), ("method", "get"))] for le in ("0.1", "1.0", "+Inf")}
    assert buckets == {"0.1": 1, "1.0": 2, "+Inf": 3}
    assert got["t_seconds_count", (("method", "get"),)] == 3
    assert got["t_seconds_sum", (("method", "get"),)] == pytest.approx(5.55)
    assert seconds.count("get") == 3 and calls.value("get", "OK") == 2


def test_file_families_get_the_key_label(tmp_path):
    ops = metrics.Tally("d_ops_total", "ops", ["op"])
    ops.add("read")
    metrics.write_file(str(tmp_path / "aaaa.prom"), metrics.render(ops))
    ops.add("read")
    metrics.write_file(str(tmp_path / "bbbb.prom"), metrics.render(ops))
    metrics.write_file(str(tmp_path / "stale.prom"), metrics.render(ops))
    (tmp_path / "garbled.prom").write_text("this is { not the text format\n")
    names = ["aaaa", "bbbb", "garbled", "missing"]
    got = parsed(metrics.FileFamilies(str(tmp_path), "key", lambda: names))
    assert got == {
        ("d_ops_total", (("key", "aaaa"), ("op", "read"))): 1,
        ("d_ops_total", (("key", "bbbb"), ("op", "read"))): 2,
    }
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize("address", ["9810", "host:", "host:port", "host:70000"])
def test_bad_metrics_addresses(address):
    with pytest.raises(ValueError, match="HOST:PORT"):
        metrics.split_address(address)


def test_good_metrics_addresses():
    assert metrics.split_address("0.0.0.0:9810") == ("0.0.0.0", 9810)
    assert metrics.split_address("[::1]:9810") == ("::1", 9810)
    assert metrics.split_address(":9810") == ("0.0.0.0", 9810)
    assert metrics.serve(None) is None


async def test_events_without_an_api_are_only_logged(monkeypatch, caplog):
    from fusecsi.events import Events
    from fusecsi.k8s import KubeApi

    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    events = Events(KubeApi(None), "fusecsi-test")
    with caplog.at_level("INFO", logger="fusecsi.events"):
        events.post_on_pod("ns", "pod", "MountBroken", "broken")
        events.post_on_volume("1;d;h:1;/;v", "DeleteRefused", "refused")
    skipped = [r for r in caplog.records if "no Kubernetes API configured" in r.getMessage()]
    assert len(skipped) == 2
    assert events._receive.statistics().current_buffer_used == 0  # nothing queued
