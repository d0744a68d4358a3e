"""fusecsi/k8s.py against the small fake Kubernetes API server of tests/support/controller.py
(a real kube-apiserver cannot run here) and against an address where nothing answers."""

from __future__ import annotations

import socket

import pytest
from support.controller import kube_api

from fusecsi.k8s import KubeApi, KubeError, KubeNotConfigured, KubeNotFound, KubeUnavailable

__all__ = ["kube_api"]  # fixture


async def test_reads_labels_and_annotations(kube_api, tmp_path):
    kube_api.add_pvc("ns1", "claim", labels={"app": "db"}, annotations={"a/b": "c"})
    kube_api.add_pvc("ns1", "plain")
    api = KubeApi(str(kube_api.write_kubeconfig(tmp_path / "kubeconfig")))
    meta = await api.pvc_metadata("ns1", "claim")
    assert (meta.labels, meta.annotations) == ({"app": "db"}, {"a/b": "c"})
    assert (await api.pvc_metadata("ns1", "plain")).labels == {}
    with pytest.raises(KubeNotFound, match="ns1/absent"):
        await api.pvc_metadata("ns1", "absent")
    kube_api.forbidden.add("locked")
    with pytest.raises(KubeError, match="403"):
        await api.pvc_metadata("locked", "claim")


async def test_kubeconfig_from_the_environment(kube_api, tmp_path, monkeypatch):
    kube_api.add_pvc("ns2", "claim", labels={"k": "v"})
    monkeypatch.setenv("KUBECONFIG", str(kube_api.write_kubeconfig(tmp_path / "kubeconfig")))
    assert (await KubeApi().pvc_metadata("ns2", "claim")).labels == {"k": "v"}


async def test_no_api_configured(monkeypatch):
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    api = KubeApi()
    assert not api.configured
    with pytest.raises(KubeNotConfigured, match="no Kubernetes API configured"):
        await api.pvc_metadata("ns", "claim")


async def test_api_that_does_not_answer(kube_api, tmp_path):
    # a listener that accepts and never replies, then one that refuses
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    try:
        for url in (f"http://127.0.0.1:{silent.getsockname()[1]}", "http://127.0.0.1:9"):
            kube_api_copy = type(kube_api)(url=url)
            path = kube_api_copy.write_kubeconfig(tmp_path / "kubeconfig")
            with pytest.raises(KubeUnavailable, match="claim|did not answer"):
                await KubeApi(str(path), timeout=0.5).pvc_metadata("ns", "claim")
    finally:
        silent.close()


async def test_reads_a_storage_class(kube_api, tmp_path):
    kube_api.add_storage_class("kept", "Retain")
    api = KubeApi(str(kube_api.write_kubeconfig(tmp_path / "kubeconfig")))
    assert (await api.run(api.read_storage_class, "kept"))["reclaimPolicy"] == "Retain"
    with pytest.raises(KubeNotFound, match="StorageClass absent not found"):
        await api.run(api.read_storage_class, "absent")
