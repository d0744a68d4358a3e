"""The users' StatefulSet scenarios, played through the real CSI sockets the way
external-provisioner (CreateVolume/DeleteVolume) and kubelet (NodePublish/Unpublish) would.

"Pods" are real processes doing I/O on their kubelet-style target paths; "nodes" are
mountd + node plugin pairs with their own kubelet directories.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio
from grpclib.exceptions import GRPCError

from fusecsi import engines
from fusecsi.csi import bridge as grpc_bridge
from fusecsi.csi.generated import csi_pb2 as pb
from fusecsi.dev.stack import Container, DevStack, Node, leftover_mounts
from fusecsi.mountd.client import MountdClient

GIB = 1 << 30
Mode = pb.VolumeCapability.AccessMode.Mode


class ScenarioFailed(Exception):
    pass


def check(condition: bool, message: str) -> None:
    if not condition:
        raise ScenarioFailed(message)


@dataclass
class StorageClass:
    name: str
    parameters: dict[str, str]
    reclaim_policy: str = "Delete"
    # the CSI secret its provisioner-, node-publish- and controller-expand-secret name
    secrets: dict[str, str] = field(default_factory=dict, repr=False)


@dataclass
class Claim:
    """A PVC and the PV external-provisioner made for it."""

    name: str
    storage_class: StorageClass
    pv_name: str = ""
    volume: pb.Volume | None = None
    phase: str = "Pending"


@dataclass
class Pod:
    name: str
    node: Node
    claim: Claim
    uid: str = field(default_factory=lambda: str(uuid.uuid4()))

    @property
    def target(self) -> Path:
        return (
            self.node.kubelet_dir
            / "pods"
            / self.uid
            / "volumes"
            / "kubernetes.io~csi"
            / self.claim.pv_name
            / "mount"
        )


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=False)]
    lines = [headers, *rows]
    return "\n".join(
        "   ".join(str(v).ljust(w) for v, w in zip(line, widths, strict=False)).rstrip()
        for line in lines
    )


def mount_capability(mode=Mode.SINGLE_NODE_WRITER) -> pb.VolumeCapability:
    return pb.VolumeCapability(
        mount=pb.VolumeCapability.MountVolume(),
        access_mode=pb.VolumeCapability.AccessMode(mode=mode),
    )


class Walkthrough:
    def __init__(self, stack: DevStack, out: Callable[[str], None] = print) -> None:
        self.stack = stack
        self.out = out
        self.claims: dict[str, Claim] = {}
        self.pods: dict[str, Pod] = {}
        self.results: list[tuple[str, bool, str]] = []

    # ---- plumbing -------------------------------------------------------------------------

    def step(self, text: str) -> None:
        self.out(f"==> {text}")

    def show(self, title: str, text: str) -> None:
        self.out(f"\n$ {title}\n{text}\n")

    async def run(self) -> bool:
        node_sockets = [str(n.csi_socket) for n in self.stack.nodes]
        sockets = [str(self.stack.controller_socket), *node_sockets]
        async with grpc_bridge.connect_many(sockets) as (controller, *nodes):
            self.controller = controller
            self.node_calls = {
                n.name: call for n, call in zip(self.stack.nodes, nodes, strict=True)
            }
            engine = engines.node_engine(self.stack.engine)
            self.fstype = engine.fstype
            cluster = engine.parse_cluster(self.stack.parameters, self.stack.secrets)
            # what `fusecsi fs ls` shows an administrator, through the engine's own namespace
            async with engines.open_namespace(cluster, timeout=10) as namespace:
                self.namespace = namespace
                for title, scenario in self.scenarios():
                    await self._play(title, scenario)
        self.out("\nSummary")
        for title, ok, detail in self.results:
            self.out(f"  {'PASS' if ok else 'FAIL'}  {title}{'' if ok else ': ' + detail}")
        passed = all(ok for _, ok, _ in self.results)
        self.out(f"\n{'PASS' if passed else 'FAIL'}: {len(self.results)} scenarios")
        return passed

    async def _play(self, title: str, scenario: Callable[[], Awaitable[None]]) -> None:
        self.out(f"\n### {title}")
        try:
            with trio.fail_after(180):
                await scenario()
        # except*: a scenario with a nursery (the recovery's containers) raises a group
        except* (ScenarioFailed, GRPCError, OSError, trio.TooSlowError) as group:
            detail = "; ".join(f"{type(exc).__name__}: {exc}" for exc in _leaves(group))
            self.out(f"!!! {detail}")
            self.results.append((title, False, detail))
        else:
            self.results.append((title, True, ""))

    def scenarios(self):
        return [
            ("StatefulSet web-app: one PVC and one directory per replica", self.statefulset),
            ("Pod deleted and recreated keeps its data", self.pod_recreated),
            ("Scale down to 2 and back up to 3 rebinds the old PVC", self.scale_down_up),
            ("A crashed FUSE daemon is replaced; every pod's mount comes back", self.recovery),
            ("Sharing rule: one FUSE daemon per (cluster, fs-path)", self.sharing_rule),
            ("Expand, retain, and a directory fusecsi did not make", self.expand_and_keep),
            ("StatefulSet and PVCs deleted: on-delete policy applied", self.teardown),
            ("podinfo: blobs by SHA1 key across two nodes", self.podinfo),
            ("Static PV: a pre-created directory without CreateVolume", self.static_pv),
            ("Nothing left behind: no daemon, no mount", self.nothing_left),
        ]

    # ---- what external-provisioner and kubelet do -----------------------------------------

    def storage_class(
        self, name: str, fs_path: str, on_delete: str, path_pattern: str = ""
    ) -> StorageClass:
        params = {**self.stack.parameters, "fs-path": fs_path}
        params["on-delete"] = on_delete
        if path_pattern:
            params["path-pattern"] = path_pattern
        self.show(
            f"kubectl get storageclass {name} -o jsonpath='{{.parameters}}'", json.dumps(params)
        )
        return StorageClass(name, params, "Delete", self.stack.secrets)

    async def provision(self, claim_name: str, sc: StorageClass, size=GIB) -> Claim:
        claim = self.claims.get(claim_name)
        if claim is not None:
            return claim  # a StatefulSet reuses its PVC by name
        claim = Claim(claim_name, sc, pv_name=f"pvc-{uuid.uuid4()}")
        parameters = {
            **sc.parameters,
            "csi.storage.k8s.io/pvc/name": claim_name,
            "csi.storage.k8s.io/pvc/namespace": "default",
            "csi.storage.k8s.io/pv/name": claim.pv_name,
        }
        reply = await self.controller(
            "Controller",
            "CreateVolume",
            pb.CreateVolumeRequest(
                name=claim.pv_name,
                capacity_range=pb.CapacityRange(required_bytes=size),
                volume_capabilities=[mount_capability()],
                parameters=parameters,
                secrets=sc.secrets,
            ),
        )
        claim.volume, claim.phase = reply.volume, "Bound"
        self.claims[claim_name] = claim
        return claim

    async def delete_claim(self, claim: Claim) -> None:
        request = pb.DeleteVolumeRequest(
            volume_id=claim.volume.volume_id, secrets=claim.storage_class.secrets
        )
        await self.controller("Controller", "DeleteVolume", request)
        del self.claims[claim.name]

    async def start_pod(self, name: str, node: Node, claim: Claim) -> Pod:
        pod = Pod(name, node, claim)
        pod.target.parent.mkdir(parents=True, exist_ok=True)  # kubelet makes the parent
        await self.node_calls[node.name](
            "Node",
            "NodePublishVolume",
            pb.NodePublishVolumeRequest(
                volume_id=claim.volume.volume_id,
                target_path=str(pod.target),
                volume_capability=mount_capability(),
                volume_context=dict(claim.volume.volume_context),
                secrets=claim.storage_class.secrets,
            ),
        )
        self.pods[name] = pod
        return pod

    async def delete_pod(self, pod: Pod) -> None:
        await self.node_calls[pod.node.name](
            "Node",
            "NodeUnpublishVolume",
            pb.NodeUnpublishVolumeRequest(
                volume_id=pod.claim.volume.volume_id, target_path=str(pod.target)
            ),
        )
        del self.pods[pod.name]

    async def in_pod(self, pod: Pod, script: str) -> str:
        """Run a shell script as the pod's container would, with the volume at $DATA."""
        result = await trio.run_process(
            ["sh", "-euc", script],
            env={"DATA": str(pod.target), "PATH": "/usr/bin:/bin"},
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        if result.returncode != 0:
            raise ScenarioFailed(f"{pod.name}: {script!r} failed: {result.stderr.decode()}")
        return result.stdout.decode()

    async def daemons(self, node: Node) -> list[dict]:
        return await MountdClient(str(node.mountd_socket)).list()

    async def cluster_ls(self, path: str) -> list[str]:
        try:
            entries = await self.namespace.listdir(path)
        except FileNotFoundError:
            return []
        return sorted(os.path.basename(entry.path) for entry in entries)

    # ---- tables ----------------------------------------------------------------------------

    def show_pvcs(self) -> None:
        rows = [
            [
                c.name,
                c.phase,
                c.pv_name,
                _size(c.volume.capacity_bytes),
                "RWO",
                c.storage_class.name,
            ]
            for c in self.claims.values()
        ]
        headers = ["NAME", "STATUS", "VOLUME", "CAPACITY", "ACCESS MODES", "STORAGECLASS"]
        self.show("kubectl get pvc", table(headers, rows))

    def show_pvs(self) -> None:
        rows = [
            [
                c.pv_name,
                _size(c.volume.capacity_bytes),
                "RWO",
                c.storage_class.reclaim_policy,
                "Bound",
                f"default/{c.name}",
                c.storage_class.name,
                c.volume.volume_context.get("subpath", ""),
            ]
            for c in self.claims.values()
        ]
        headers = ["NAME", "CAPACITY", "ACCESS MODES", "RECLAIM POLICY", "STATUS", "CLAIM"]
        self.show("kubectl get pv", table([*headers, "STORAGECLASS", "SUBPATH"], rows))

    def show_pods(self) -> None:
        pods = sorted(self.pods.values(), key=lambda p: p.name)
        rows = [[p.name, "1/1", "Running", p.node.name, p.claim.name] for p in pods]
        self.show(
            "kubectl get pods -o wide", table(["NAME", "READY", "STATUS", "NODE", "CLAIM"], rows)
        )

    async def show_daemons(self) -> list[dict]:
        rows, everything = [], []
        for node in self.stack.nodes:
            for daemon in await self.daemons(node):
                everything.append(daemon)
                rows.append(
                    [
                        node.name,
                        daemon["key"],
                        daemon["fs_path"],
                        str(daemon["pid"]),
                        daemon["state"],
                        str(daemon["restarts"]),
                        str(len(daemon["refs"])),
                    ]
                )
        headers = ["NODE", "KEY", "FS-PATH", "PID", "STATE", "RESTARTS", "REFS"]
        self.show("fusecsi mountd status (every node)", table(headers, rows))
        return everything

    # ---- scenarios -------------------------------------------------------------------------

    async def statefulset(self) -> None:
        node = self.stack.nodes[0]
        self.web = self.storage_class("fusecsi-pvs", "/pvs", "delete")
        self.step("StorageClass fusecsi-pvs: fs-path /pvs, on-delete delete")
        for i in range(3):
            self.step(f"external-provisioner: CreateVolume for PVC data-web-app-{i}")
            claim = await self.provision(f"data-web-app-{i}", self.web)
            self.step(f"kubelet on {node.name}: NodePublishVolume for pod web-app-{i}")
            pod = await self.start_pod(f"web-app-{i}", node, claim)
            await self.in_pod(pod, f'echo "Hello from web-app-{i}" > "$DATA/index.html"')
        self.show_pvcs()
        self.show_pvs()
        self.show_pods()
        dirs = await self.cluster_ls("/pvs")
        self.show("fusecsi fs ls /pvs", "\n".join(dirs))
        subpaths = {c.volume.volume_context["subpath"] for c in self.claims.values()}
        check(subpaths <= set(dirs) and len(subpaths) == 3, f"one directory per PVC: {dirs}")
        for i in range(3):
            pod = self.pods[f"web-app-{i}"]
            page = await self.in_pod(pod, 'cat "$DATA/index.html"; ls -A "$DATA"')
            check(
                page == f"Hello from web-app-{i}\nindex.html\n",
                f"{pod.name} sees only its own data, got {page!r}",
            )
        pod = self.pods["web-app-0"]
        self.show(
            'kubectl exec web-app-0 -- sh -c "mount | grep /usr/share/nginx/html"',
            mount_line(pod.target),
        )
        check(
            f"type {self.fstype}" in mount_line(pod.target),
            f"the pod's volume is a {self.fstype} mount served by the shared daemon",
        )
        daemons = await self.show_daemons()
        check(len(daemons) == 1, f"one shared FUSE daemon for /pvs, found {len(daemons)}")
        check(len(daemons[0]["refs"]) == 3, "the shared daemon holds three references")

    async def pod_recreated(self) -> None:
        old = self.pods["web-app-0"]
        self.step("kubectl delete pod web-app-0: NodeUnpublishVolume")
        await self.delete_pod(old)
        check(not old.target.is_mount(), "the old target is unmounted")
        self.step("the StatefulSet controller recreates web-app-0: NodePublishVolume")
        pod = await self.start_pod("web-app-0", old.node, old.claim)
        page = await self.in_pod(pod, 'cat "$DATA/index.html"')
        check(page == "Hello from web-app-0\n", f"data survived the pod, got {page!r}")
        self.show_pods()

    async def scale_down_up(self) -> None:
        self.step("kubectl scale statefulset web-app --replicas=2")
        pod = self.pods["web-app-2"]
        await self.delete_pod(pod)
        self.show_pods()
        self.show_pvcs()
        check("data-web-app-2" in self.claims, "the PVC of web-app-2 is kept")
        subpath = self.claims["data-web-app-2"].volume.volume_context["subpath"]
        check(subpath in await self.cluster_ls("/pvs"), "its directory is kept on the cluster")
        self.step("kubectl scale statefulset web-app --replicas=3")
        claim = await self.provision("data-web-app-2", self.web)
        pod = await self.start_pod("web-app-2", self.stack.nodes[0], claim)
        page = await self.in_pod(pod, 'cat "$DATA/index.html"')
        check(page == "Hello from web-app-2\n", f"the old data is back, got {page!r}")

    async def recovery(self) -> None:
        node = self.stack.nodes[0]
        pods = [self.pods[f"web-app-{i}"] for i in range(3)]
        self.step(
            "each pod's container holds its volume the way runc sets up mountPropagation: "
            "HostToContainer (own mount namespace, a slave copy at /usr/share/nginx/html) "
            "and writes and reads a file there every 50 ms"
        )
        containers = {
            pod.name: Container(
                pod.target,
                self.stack.work_dir / "containers" / pod.name / "usr/share/nginx/html",
                ".probe",
            )
            for pod in pods
        }
        async with trio.open_nursery() as nursery:
            for container in containers.values():
                await nursery.start(container.run)
            await self._kill_and_recover(node, pods, containers)
            nursery.cancel_scope.cancel()

    async def _kill_and_recover(self, node: Node, pods: list[Pod], containers: dict) -> None:
        (daemon,) = await self.daemons(node)
        self.step(f"kill -9 {daemon['pid']}: the FUSE daemon serving /pvs on {node.name} dies")
        killed_at, killed_clock = trio.current_time(), time.monotonic()
        os.kill(daemon["pid"], signal.SIGKILL)
        pages: list[str] | None = None
        with trio.move_on_after(30):
            while pages is None:
                try:
                    pages = [await self.in_pod(pod, 'cat "$DATA/index.html"') for pod in pods]
                except ScenarioFailed:  # still the dead mount: ENOTCONN
                    await trio.sleep(0.2)
        check(pages is not None, "the pods' mounts came back within 30 s")
        for i, (pod, page) in enumerate(zip(pods, pages, strict=True)):
            check(page == f"Hello from web-app-{i}\n", f"{pod.name} reads its data again")
        await self.in_pod(pods[0], 'echo "written after recovery" > "$DATA/after.txt"')
        took = trio.current_time() - killed_at
        self.step(
            f"mountd replaced it and all {len(pages)} targets serve again in {took:.1f}s; "
            "the pods read and write again without restarting"
        )
        outages = {}
        with trio.move_on_after(30):
            for name, container in containers.items():
                outages[name] = await container.outage(killed_clock)
        check(len(outages) == len(containers), "every running container reads and writes again")
        self.show(
            "inside each container: how long I/O on /usr/share/nginx/html stopped (first failure "
            "to first success, or the stall when the new daemon took the connection over); "
            "nothing restarted, nothing reopened but its file",
            table(
                ["POD", "NO I/O FOR", "FIRST ERROR"],
                [
                    [name, f"{seconds:.2f}s", _first_error(containers[name], killed_clock)]
                    for name, seconds in outages.items()
                ],
            ),
        )
        (replacement,) = await self.show_daemons()
        check(replacement["pid"] != daemon["pid"], "a new daemon serves the key")
        check(replacement["restarts"] >= 1, "the replacement is counted as a restart")

    async def sharing_rule(self) -> None:
        self.step(
            "StorageClass fusecsi-archive: fs-path /pvs-archive, on-delete archive, "
            "path-pattern ${pvc.metadata.namespace}/${pvc.metadata.name}"
        )
        self.other = self.storage_class(
            "fusecsi-archive",
            "/pvs-archive",
            "archive",
            "${pvc.metadata.namespace}/${pvc.metadata.name}",
        )
        node = self.stack.nodes[0]
        for i in range(2):
            claim = await self.provision(f"logs-collector-{i}", self.other)
            pod = await self.start_pod(f"collector-{i}", node, claim)
            await self.in_pod(pod, f'echo "log line {i}" > "$DATA/app.log"')
        dirs = await self.cluster_ls("/pvs-archive/default")
        self.show("fusecsi fs ls /pvs-archive/default", "\n".join(dirs))
        check(dirs == ["logs-collector-0", "logs-collector-1"], "directories follow path-pattern")
        daemons = await self.show_daemons()
        by_path = {d["fs_path"]: len(d["refs"]) for d in daemons}
        check(len(daemons) == 2, f"two FUSE daemons (one per fs-path), found {len(daemons)}")
        check(by_path == {"/pvs": 3, "/pvs-archive": 2}, f"references per daemon: {by_path}")

    async def expand_and_keep(self) -> None:
        claim = self.claims["data-web-app-0"]
        self.step("kubectl patch pvc data-web-app-0 to 2Gi: ControllerExpandVolume")
        reply = await self.controller(
            "Controller",
            "ControllerExpandVolume",
            pb.ControllerExpandVolumeRequest(
                volume_id=claim.volume.volume_id,
                capacity_range=pb.CapacityRange(required_bytes=2 * GIB),
                secrets=claim.storage_class.secrets,
            ),
        )
        check(reply.capacity_bytes >= 2 * GIB, f"expanded to {reply.capacity_bytes} bytes")
        claim.volume.capacity_bytes = reply.capacity_bytes
        context = claim.volume.volume_context
        quota = await self.namespace.get_quota(f"{context['fs-path']}/{context['subpath']}")
        check(quota == 2 * GIB, f"the directory's quota follows the PVC: {quota}")
        self.show_pvcs()

        keep = self.storage_class("fusecsi-keep", "/pvs-keep", "retain")
        self.step("StorageClass fusecsi-keep: on-delete retain; a PVC written to, then deleted")
        claim = await self.provision("scratch-0", keep)
        pod = await self.start_pod("scratch-0", self.stack.nodes[1], claim)
        await self.in_pod(pod, 'echo "keep me" > "$DATA/notes"')
        await self.delete_pod(pod)
        await self.delete_claim(claim)
        kept = await self.cluster_ls("/pvs-keep")
        subpath = claim.volume.volume_context["subpath"]
        check(subpath in kept, f"on-delete retain kept the directory: {kept}")

        self.step("an administrator's own directory /pvs-keep/home; a PVC named home arrives")
        await self.namespace.mkdirs("/pvs-keep/home")
        named = self.storage_class("fusecsi-named", "/pvs-keep", "delete", "${pvc.metadata.name}")
        try:
            await self.provision("home", named)
        except GRPCError as exc:
            self.step(f"CreateVolume answers {exc.status.name}: {exc.message}")
            check(exc.status.name == "ALREADY_EXISTS", f"refused as ALREADY_EXISTS: {exc}")
        else:
            raise ScenarioFailed("CreateVolume adopted a directory fusecsi did not make")
        check("home" in await self.cluster_ls("/pvs-keep"), "the administrator's directory stays")

    async def teardown(self) -> None:
        self.step("kubectl delete statefulset web-app collector: NodeUnpublishVolume for each pod")
        for pod in list(self.pods.values()):
            await self.delete_pod(pod)
        self.show_pods()
        daemons = await self.show_daemons()
        check(daemons == [], f"no FUSE daemon once no pod uses a volume: {daemons}")
        self.step("the PVCs outlive their StatefulSet (StatefulSet PVC protection)")
        self.show_pvcs()
        self.step("kubectl delete pvc --all: DeleteVolume (reclaim policy Delete)")
        archive_dirs = {}
        for claim in list(self.claims.values()):
            subpath = claim.volume.volume_context["subpath"]
            fs_path = claim.volume.volume_context["fs-path"]
            archive_dirs.setdefault(fs_path, []).append(subpath)
            await self.delete_claim(claim)
        pvs = await self.cluster_ls("/pvs")
        archived = await self.cluster_ls("/pvs-archive/default")
        listing = ["/pvs:", *pvs, "/pvs-archive/default:", *archived]
        self.show("fusecsi fs ls /pvs /pvs-archive/default", "\n".join(listing))
        check(not set(archive_dirs["/pvs"]) & set(pvs), "on-delete delete removed the directories")
        for subpath in archive_dirs["/pvs-archive"]:
            name = subpath.rsplit("/", 1)[-1]
            check(name not in archived, f"{subpath} was moved aside")
            check(
                any(entry.startswith(name + ".archived-") for entry in archived),
                f"on-delete archive kept {subpath} renamed aside",
            )

    async def podinfo(self) -> None:
        sc = self.storage_class("fusecsi-podinfo", "/podinfo", "delete")
        self.step("StatefulSet podinfo: 2 replicas, one per node (pod anti-affinity)")
        blobs = {}
        for i, node in enumerate(self.stack.nodes):
            claim = await self.provision(f"data-podinfo-{i}", sc)
            pod = await self.start_pod(f"podinfo-{i}", node, claim)
            blob = f"blob {i} written by podinfo-{i} on {node.name}\n"
            key = hashlib.sha1(blob.encode()).hexdigest()
            blobs[pod.name] = (key, blob)
            self.step(f"POST /store to podinfo-{i}: key {key}")
            await self.in_pod(pod, f"printf %s '{blob}' > \"$DATA/{key}\"")
        self.show_pods()
        for name, (key, blob) in blobs.items():
            pod = self.pods[name]
            got = await self.in_pod(pod, f'cat "$DATA/{key}"')
            check(got == blob, f"{name} reads its blob back by key")
            check(hashlib.sha1(got.encode()).hexdigest() == key, "the key is the blob's SHA1")
        self.step("node-a drained: podinfo-0 rescheduled onto node-b keeps its blobs")
        moved = self.pods["podinfo-0"]
        await self.delete_pod(moved)
        pod = await self.start_pod("podinfo-0", self.stack.nodes[1], moved.claim)
        key, blob = blobs["podinfo-0"]
        check(await self.in_pod(pod, f'cat "$DATA/{key}"') == blob, "the blob followed the pod")
        self.show_pods()
        for pod in list(self.pods.values()):
            await self.delete_pod(pod)
        for claim in list(self.claims.values()):
            await self.delete_claim(claim)

    async def static_pv(self) -> None:
        self.step("an administrator prepares /static/vol-0001 on the cluster")
        await self.namespace.mkdirs("/static/vol-0001")
        text = "prepared by the storage team\n"
        context = {**self.stack.parameters, "fs-path": "/static", "subpath": "vol-0001"}
        self.show(
            "kubectl get pv pv-0001 -o jsonpath='{.spec.csi}'",
            json.dumps(
                {"driver": "csi.fusecsi.io", "volumeHandle": "pv-0001", "volumeAttributes": context}
            ),
        )
        sc = StorageClass("", context, "Retain", self.stack.secrets)
        claim = Claim("pvc-0001", sc, pv_name="pv-0001", phase="Bound")
        claim.volume = pb.Volume(volume_id="pv-0001", volume_context=context, capacity_bytes=GIB)
        self.claims[claim.name] = claim
        self.step("the administrator's job on node-a writes its README; a pod on node-b reads it")
        writer = await self.start_pod("prepare-0001", self.stack.nodes[0], claim)
        await self.in_pod(writer, f"printf %s '{text}' > \"$DATA/README\"")
        await self.delete_pod(writer)
        pod = await self.start_pod("podpvc-0001", self.stack.nodes[1], claim)
        got = await self.in_pod(pod, 'cat "$DATA/README"')
        check(got == text, f"the pod reads the prepared file, got {got!r}")
        await self.delete_pod(pod)
        del self.claims[claim.name]
        check("vol-0001" in await self.cluster_ls("/static"), "unpublishing keeps the directory")

    async def nothing_left(self) -> None:
        daemons = await self.show_daemons()
        check(daemons == [], f"no FUSE daemon left: {daemons}")
        kubelet_dirs = {str(node.kubelet_dir) for node in self.stack.nodes}  # kubelet's own
        mounts = [m for m in leftover_mounts(self.stack.work_dir) if m not in kubelet_dirs]
        check(mounts == [], f"no mount left under the work directory: {mounts}")


def mount_line(target: Path) -> str:
    """What `mount | grep <target>` prints, read from /proc/self/mountinfo."""
    with open("/proc/self/mountinfo") as table:
        for line in table:
            before, _, after = line.partition(" - ")
            mount = before.split()
            if mount[4] == str(target):
                fstype, source, _ = after.split(maxsplit=2)
                return f"{source} on {target} type {fstype} ({mount[5]})"
    return f"{target} is not a mount point"


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    return [
        leaf
        for exc in group.exceptions
        for leaf in (_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    ]


def _first_error(container: Container, since: float) -> str:
    return next((e for ok, e, at in container.rounds if at > since and not ok), "-")


def _size(capacity: int) -> str:
    if capacity and capacity % GIB == 0:
        return f"{capacity // GIB}Gi"
    return f"{capacity // (1 << 20)}Mi"
