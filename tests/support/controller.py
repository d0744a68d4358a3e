"""Shared by the controller tests: a real cluster (master + worker on loopback), real
`fusecsi controller` processes, and a small fake Kubernetes API server.

The fake API server exists because a real kube-apiserver cannot run here: it serves only the
calls fusecsi makes (GET a PVC, a pod or a StorageClass, list PVs, POST an Event) from dicts the test fills
in, and records every Event POSTed so tests can assert on them.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from fusecsi.cluster.client import ClusterClient
from fusecsi.cluster.local import LocalCluster
from fusecsi.csi import bridge as grpc_bridge
from fusecsi.csi.generated import csi_pb2 as pb
from support.processes import Spawner, wait_for_path

GiB = 1 << 30


@dataclass
class FakeKubeApi:
    """PVCs and pods by (namespace, name), PVs and StorageClasses by name; `requests` records every path asked
    for, `events` every Event posted."""

    pvcs: dict[tuple[str, str], dict] = field(default_factory=dict)
    pods: dict[tuple[str, str], dict] = field(default_factory=dict)
    pvs: dict[str, dict] = field(default_factory=dict)
    storage_classes: dict[str, dict] = field(default_factory=dict)
    forbidden: set[str] = field(default_factory=set)  # namespaces answered with 403
    requests: list[str] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    url: str = ""

    def add_pod(self, namespace: str, name: str) -> None:
        metadata = {"namespace": namespace, "name": name, "uid": f"uid-{namespace}-{name}"}
        self.pods[namespace, name] = {"apiVersion": "v1", "kind": "Pod", "metadata": metadata}

    def add_pv(self, name: str, volume_handle: str, claim: tuple[str, str] | None = None) -> None:
        spec: dict = {"csi": {"driver": "fusecsi.io", "volumeHandle": volume_handle}}
        if claim is not None:
            namespace, claim_name = claim
            spec["claimRef"] = {"namespace": namespace, "name": claim_name}
        self.pvs[name] = {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": name, "uid": f"uid-pv-{name}"},
            "spec": spec,
        }

    def events_about(self, name: str) -> list[dict]:
        return [e for e in list(self.events) if e["involvedObject"]["name"] == name]

    def add_storage_class(self, name: str, reclaim_policy: str) -> None:
        self.storage_classes[name] = {
            "apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClass",
            "metadata": {"name": name, "uid": f"uid-sc-{name}"},
            "provisioner": "fusecsi.io",
            "reclaimPolicy": reclaim_policy,
        }

    def add_pvc(
        self, namespace: str, name: str, labels=None, annotations=None, storage_class=None
    ) -> None:
        metadata = {"namespace": namespace, "name": name, "uid": f"uid-{namespace}-{name}"}
        if labels is not None:
            metadata["labels"] = labels
        if annotations is not None:
            metadata["annotations"] = annotations
        self.pvcs[namespace, name] = {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": metadata,
            "spec": {"accessModes": ["ReadWriteOnce"]},
        }
        if storage_class is not None:
            self.pvcs[namespace, name]["spec"]["storageClassName"] = storage_class

    def write_kubeconfig(self, path: Path) -> Path:
        path.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
                    "users": [{"name": "u", "user": {"token": "kube-token"}}],
                    "contexts": [{"name": "c", "context": {"cluster": "fake", "user": "u"}}],
                    "current-context": "c",
                }
            )
        )
        return path


def _handler(api: FakeKubeApi):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            api.requests.append(self.path)
            parts = self.path.split("?")[0].strip("/").split("/")
            # api/v1/namespaces/<ns>/persistentvolumeclaims/<name>, .../pods/<name>
            found = None
            if len(parts) == 6 and parts[:3] == ["api", "v1", "namespaces"]:
                if parts[4] == "persistentvolumeclaims":
                    found = api.pvcs.get((parts[3], parts[5]))
                elif parts[4] == "pods":
                    found = api.pods.get((parts[3], parts[5]))
            elif parts[:4] == ["apis", "storage.k8s.io", "v1", "storageclasses"]:
                found = api.storage_classes.get(parts[4]) if len(parts) == 5 else None
            elif parts == ["api", "v1", "persistentvolumes"]:
                found = {"kind": "PersistentVolumeList", "items": list(api.pvs.values())}
            body, code = (found, 200) if found else ({"kind": "Status", "code": 404}, 404)
            if len(parts) > 3 and parts[3] in api.forbidden:
                body, code = {"kind": "Status", "code": 403}, 403
            self._answer(code, body)

        def do_POST(self) -> None:
            api.requests.append(self.path)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            parts = self.path.split("?")[0].strip("/").split("/")
            if len(parts) == 5 and parts[4] == "events":
                body["metadata"]["name"] = body["metadata"]["generateName"] + os.urandom(4).hex()
                api.events.append(body)
                self._answer(201, body)
            else:
                self._answer(404, {"kind": "Status", "code": 404})

        def _answer(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:
            pass

    return Handler


@pytest.fixture(scope="module")
def kube_api() -> Iterator[FakeKubeApi]:
    api = FakeKubeApi()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(api))
    api.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield api
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path_factory.mktemp("cluster"), workers=1) as c:
        yield c


@pytest.fixture(scope="module")
def module_spawn(tmp_path_factory) -> Iterator[Spawner]:
    spawner = Spawner(tmp_path_factory.mktemp("logs"))
    try:
        yield spawner
    finally:
        spawner.close()


def start_controller(spawn, directory: Path, *args: str, env: dict | None = None):
    """A `fusecsi controller` process; returns (process, socket path)."""
    sock = directory / f"controller-{len(spawn.procs)}.sock"
    # no kubeconfig unless the test passes one
    environment = {"KUBECONFIG": "", **(env or {})}
    proc = spawn(
        "controller", "--endpoint", f"unix://{sock}", *args, name="controller", env=environment
    )
    wait_for_path(sock, proc)  # the path appears only once the server listens
    return proc, sock


@pytest.fixture(scope="module")
def controller(module_spawn, kube_api, tmp_path_factory):
    """The controller most tests share, with the fake Kubernetes API configured."""
    directory = tmp_path_factory.mktemp("controller")
    kubeconfig = kube_api.write_kubeconfig(directory / "kubeconfig")
    proc, sock = start_controller(
        module_spawn, directory, "--kubeconfig", str(kubeconfig), "--cluster-timeout", "3"
    )
    return proc, sock


@pytest.fixture
async def csi(controller):
    async with grpc_bridge.connect(str(controller[1])) as call:

        async def controller_call(method: str, request):
            return await call("Controller", method, request)

        yield controller_call


@asynccontextmanager
async def open_client(master_addrs: str, token: str | None = None, **options):
    async with ClusterClient(master_addrs, token=token, timeout=5, **options) as client:
        yield client


def mount_cap(mode=pb.VolumeCapability.AccessMode.SINGLE_NODE_WRITER) -> pb.VolumeCapability:
    return pb.VolumeCapability(
        mount=pb.VolumeCapability.MountVolume(),
        access_mode=pb.VolumeCapability.AccessMode(mode=mode),
    )


def create_request(name: str, parameters: dict, *, required=0, limit=0, **extra):
    request = pb.CreateVolumeRequest(
        name=name, parameters=parameters, volume_capabilities=[mount_cap()], **extra
    )
    if required or limit:
        request.capacity_range.required_bytes = required
        request.capacity_range.limit_bytes = limit
    return request


def unique(prefix: str) -> str:
    return f"{prefix}-{os.urandom(4).hex()}"
