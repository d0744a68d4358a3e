"""The one user of the kubernetes client: reading a PVC's labels and annotations for a
path-pattern and a StorageClass's reclaimPolicy, finding the objects a volume or pod belongs
to, and posting Events (`fusecsi/events.py` decides when).

The client is blocking and slow to import, so it is imported on first use and every call
runs in a thread under a deadline. Configuration: a kubeconfig file (--kubeconfig or
KUBECONFIG) when given, else the in-cluster service account, else "not configured".
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import trio

IN_CLUSTER_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"


class KubeError(Exception):
    """The API answered with an error or could not be reached."""


class KubeNotConfigured(KubeError):
    """Neither a kubeconfig nor an in-cluster service account is available."""


class KubeNotFound(KubeError):
    pass


class KubeUnavailable(KubeError):
    pass


@dataclass(frozen=True)
class ObjectMeta:
    labels: dict[str, str]
    annotations: dict[str, str]


def _configured(kubeconfig: str | None) -> bool:
    in_cluster = bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and os.path.exists(
        IN_CLUSTER_TOKEN
    )
    return bool(kubeconfig) or in_cluster


class KubeApi:
    def __init__(self, kubeconfig: str | None = None, *, timeout: float = 10.0) -> None:
        self.kubeconfig = kubeconfig or os.environ.get("KUBECONFIG") or None
        self.timeout = timeout
        self._limiter = trio.CapacityLimiter(4)
        self._client = None
        self._core = None
        self._storage = None

    @property
    def configured(self) -> bool:
        return _configured(self.kubeconfig)

    def _api_client(self):
        if self._client is None:
            if not self.configured:
                raise KubeNotConfigured(
                    "no Kubernetes API configured: not running in a cluster and neither "
                    "--kubeconfig nor KUBECONFIG is set"
                )
            from kubernetes import client, config

            try:
                if self.kubeconfig:
                    api_client = config.new_client_from_config(config_file=self.kubeconfig)
                else:
                    configuration = client.Configuration()
                    config.load_incluster_config(client_configuration=configuration)
                    api_client = client.ApiClient(configuration)
            except Exception as exc:
                raise KubeNotConfigured(f"cannot load Kubernetes configuration: {exc}") from None
            self._client = api_client
        return self._client

    def _core_api(self):
        if self._core is None:
            from kubernetes import client

            self._core = client.CoreV1Api(self._api_client())
        return self._core

    def _storage_api(self):
        if self._storage is None:
            from kubernetes import client

            self._storage = client.StorageV1Api(self._api_client())
        return self._storage

    def _json(self, what: str, call, *args, **kwargs) -> dict:
        """One API call's JSON answer, its failures mapped onto KubeError and subclasses."""
        from kubernetes.client.exceptions import ApiException

        try:
            response = call(*args, _preload_content=False, _request_timeout=self.timeout, **kwargs)
            return json.loads(response.data)
        except ApiException as exc:
            if exc.status == 404:
                raise KubeNotFound(f"{what} not found") from None
            raise KubeError(f"{what}: {exc.status} {exc.reason}") from None
        except (OSError, ValueError) as exc:
            raise KubeUnavailable(f"{what}: {exc}") from None
        except Exception as exc:  # urllib3 errors do not share a base with OSError
            raise KubeUnavailable(f"{what}: {type(exc).__name__}") from None

    def _read_pvc(self, namespace: str, name: str) -> ObjectMeta:
        core = self._core_api()
        body = self._json(
            f"PVC {namespace}/{name}",
            core.read_namespaced_persistent_volume_claim,
            name,
            namespace,
        )
        metadata = body.get("metadata") or {}
        return ObjectMeta(
            dict(metadata.get("labels") or {}), dict(metadata.get("annotations") or {})
        )

    def read_object(self, kind: str, namespace: str, name: str) -> dict:
        """A Pod or PersistentVolumeClaim (blocking: call through `run`)."""
        core = self._core_api()
        call = {
            "Pod": core.read_namespaced_pod,
            "PersistentVolumeClaim": core.read_namespaced_persistent_volume_claim,
        }[kind]
        return self._json(f"{kind} {namespace}/{name}", call, name, namespace)

    def read_storage_class(self, name: str) -> dict:
        """A StorageClass (storage.k8s.io/v1; blocking: call through `run`)."""
        storage = self._storage_api()
        return self._json(f"StorageClass {name}", storage.read_storage_class, name)

    def volume_pv(self, volume_handle: str) -> dict | None:
        """The PersistentVolume whose CSI volume handle is `volume_handle` (blocking)."""
        core = self._core_api()
        listing = self._json("listing PersistentVolumes", core.list_persistent_volume)
        for pv in listing.get("items") or []:
            if ((pv.get("spec") or {}).get("csi") or {}).get("volumeHandle") == volume_handle:
                return pv
        return None

    def create_event(self, namespace: str, body: dict) -> dict:
        """POST one Event (blocking)."""
        core = self._core_api()
        return self._json(
            f"posting an event in {namespace}", core.create_namespaced_event, namespace, body
        )

    async def run(self, fn, *args):
        """A blocking call of this class in a thread, under the API deadline."""
        with trio.move_on_after(self.timeout + 1) as scope:
            return await trio.to_thread.run_sync(
                fn, *args, limiter=self._limiter, abandon_on_cancel=True
            )
        assert scope.cancelled_caught
        raise KubeUnavailable(f"the Kubernetes API did not answer within {self.timeout:g}s")

    async def pvc_metadata(self, namespace: str, name: str) -> ObjectMeta:
        """Labels and annotations of one PVC."""
        return await self.run(self._read_pvc, namespace, name)
