"""Publish and unpublish: the request checks, the secrets kept for restarts, the binds.

Lock order: volume lock, then target lock, then key lock. The volume lock makes the
single-writer rule (one target per volume on this node) one step with the bind; the target
lock makes "is this target free?" and "bind it" one step; the key lock serialises daemon
start/stop/recovery and binds of one key, so recovery never re-binds a target that an
unpublish is removing. Different volumes, targets and keys proceed in parallel.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import stat
import threading
from collections.abc import Mapping
from functools import partial

import trio

from fusecsi import kubelet_inputs as inputs
from fusecsi.csi import volumes
from fusecsi.engines.base import Cluster, NodeEngine
from fusecsi.logs import fields
from fusecsi.mountd import mounts
from fusecsi.mountd.keystate import err
from fusecsi.mountd.table import DEFAULT_ENGINE, Entry, Key, Ref, write_atomic

log = logging.getLogger("fusecsi.mountd.supervisor")

# Recovery binds the new mount on top of the dead one (a container's HostToContainer copy
# follows only mounts stacked on it), so every replacement adds a layer per target. A dead
# layer cannot be removed from under a live one (detaching it takes the live one with it);
# layers go at unpublish. Past this many, a target is reset instead: mounts are a node-wide
# limited resource, and only a daemon crash-looping for minutes gets here.
MAX_LAYERS = 16
MAX_SECRETS = 64  # entries, and 4 KiB per value: a CSI secret, not a data channel
MAX_SECRET_BYTES = 4096


def secrets_digest(key_id: str, secrets: Mapping[str, str]) -> str:
    """Tells two sets of secrets apart without keeping them ("" for none)."""
    if not secrets:
        return ""
    text = json.dumps(dict(sorted(secrets.items())), separators=(",", ":"))
    return hashlib.sha256(f"{key_id}|{text}".encode()).hexdigest()[:16]


def check_secrets(secrets) -> dict[str, str]:
    if not isinstance(secrets, dict) or len(secrets) > MAX_SECRETS:
        raise err(errno.EINVAL, "secrets must be a map of strings")
    for name, value in secrets.items():
        if not (isinstance(name, str) and isinstance(value, str)):
            raise err(errno.EINVAL, "secrets must be a map of strings")
        if len(value.encode(errors="surrogatepass")) > MAX_SECRET_BYTES:
            raise err(errno.EINVAL, f"secret {name!r} is longer than {MAX_SECRET_BYTES} bytes")
    return {k: v for k, v in secrets.items() if v}


class OwnedBind:
    """A bind for a thread its caller may stop waiting for (publish cancelled, deadline).

    A thread cannot be stopped, so a bind can complete after the publish gave up on it and
    would stay on the target, owned by nobody. Whichever side learns last that the bind
    both completed and was abandoned undoes it: the thread right after binding, or the
    caller when the bind had completed before it gave up. The undo removes only the mount
    this bind made, and only while it is the top one (a later publish may have stacked on
    it)."""

    def __init__(self, bind, target: str) -> None:
        self._bind, self._target = bind, target
        self._lock = threading.Lock()
        self._mount_id: int | None = None
        self._abandoned = False

    def __call__(self, *args) -> None:
        self._bind(*args)
        top = mounts.top_mount(self._target)
        with self._lock:
            self._mount_id = top.mount_id if top is not None else None
            abandoned = self._abandoned
        if abandoned:
            with contextlib.suppress(OSError):
                self.undo()

    def abandon(self) -> bool:
        """Stop waiting for it: True when it had bound already (the caller undoes it)."""
        with self._lock:
            self._abandoned = True
            return self._mount_id is not None

    def undo(self) -> None:
        top = mounts.top_mount(self._target)
        if top is not None and top.mount_id == self._mount_id:
            mounts.umount(self._target, lazy=True)


class Publishing:
    """publish / unpublish of the Supervisor (fusecsi/mountd/supervisor.py)."""

    # ------------------------------------------------------------ inputs

    async def resolve_target(self, target, code: int, *, publish: bool = False) -> str:
        """The real path of `target`; `code` when it is outside the kubelet dir or (to
        publish) not kubelet's CSI target shape (inputs.TARGET_SHAPE).

        Only the parent is resolved (it is an ordinary directory that kubelet made); the
        last component is never followed, so a broken mount at the target cannot hang it
        and a symlink there cannot redirect the bind.
        """
        try:
            inputs.check_path(target)
        except ValueError as exc:
            raise err(errno.EINVAL, f"target: {exc}") from None
        parent, name = os.path.split(target.rstrip("/"))
        if name in ("", ".", ".."):
            raise err(errno.EINVAL, f"target {target!r} has no final directory name")
        real_parent = await self._blocking(os.path.realpath, parent)
        real = os.path.join(real_parent, name)
        if not real.startswith(self.kubelet_dir.rstrip("/") + "/"):
            raise err(code, f"target {target!r} is outside the kubelet dir {self.kubelet_dir}")
        if real == self.state_dir or real.startswith(self.state_dir + "/"):
            raise err(code, f"target {target!r} is inside mountd's state dir")
        if publish:
            try:
                inputs.check_target_shape(real[len(self.kubelet_dir.rstrip("/")) + 1 :])
            except ValueError as exc:
                raise err(code, str(exc)) from None
        return real

    def engine_named(self, name) -> NodeEngine:
        """The engine `name` (EINVAL when unknown or not installed in this mountd)."""
        if not isinstance(name, str) or not name:
            raise err(errno.EINVAL, "engine must be a non-empty string")
        try:
            return self.engines(name)
        except ValueError as exc:  # BadParameter: an unknown name
            raise err(errno.EINVAL, str(exc)) from None
        except ImportError:
            raise err(errno.EINVAL, f"engine {name!r} is not available in this mountd") from None

    # ------------------------------------------------------------ secrets

    def _secrets_path(self, key_id: str) -> str:
        return os.path.join(self.secrets_dir, key_id)

    def cluster_of(self, entry: Entry, secrets: Mapping[str, str] | None = None) -> Cluster:
        """The key's cluster with `secrets`, else the ones kept for restarts."""
        if secrets is None:
            secrets = self._load_secrets(entry.key.id)
        return Cluster(entry.key.engine, entry.key.address, dict(secrets))

    async def _save_secrets(self, entry: Entry, secrets: Mapping[str, str]) -> None:
        digest = secrets_digest(entry.key.id, secrets)
        path = self._secrets_path(entry.key.id)
        if not secrets:
            if entry.secrets_digest:  # the daemon now runs without any
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        elif digest != entry.secrets_digest:
            data = json.dumps({"secrets": dict(secrets)}).encode()
            await trio.to_thread.run_sync(write_atomic, path, data)
        entry.secrets_digest = digest

    def _load_secrets(self, key_id: str) -> dict[str, str]:
        try:
            with open(self._secrets_path(key_id), "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return {}
        with contextlib.suppress(ValueError, AttributeError, TypeError):
            kept = json.loads(raw)["secrets"]
            if isinstance(kept, dict):
                return {str(k): str(v) for k, v in kept.items()}
        # a file from before engines: the embedded cluster's token alone
        token = raw.decode(errors="replace")
        return {"token": token} if token else {}

    # ------------------------------------------------------------ publish

    async def publish(
        self,
        *,
        volume_id,
        cluster,
        fs_path,
        subpath,
        target,
        readonly,
        engine=DEFAULT_ENGINE,
        options="",
        secrets=None,
        pod_namespace=None,
        pod_name=None,
        single_writer=False,
    ) -> dict:
        """Bind `subpath` of the key's mount at `target`, starting the key's daemon if
        needed. `cluster` is the engine's public address (Cluster.address) and `secrets`
        the Cluster's secrets, both as NodeEngine.parse_cluster made them."""
        try:
            inputs.check_volume_id(volume_id)
        except ValueError as exc:
            raise err(errno.EINVAL, str(exc)) from None
        if not isinstance(readonly, bool):
            raise err(errno.EINVAL, "readonly must be a boolean")
        if not isinstance(single_writer, bool):
            raise err(errno.EINVAL, "single_writer must be a boolean")
        secrets = check_secrets({} if secrets is None else secrets)
        for value in (pod_namespace, pod_name):
            if value is not None and not (isinstance(value, str) and 0 < len(value) <= 253):
                raise err(errno.EINVAL, "pod namespace and name must be short strings or None")
        node_engine = self.engine_named(engine)
        try:
            key = Key.normalized(node_engine, cluster, fs_path, options)
            subpath = volumes.validate_subpath(subpath)
        except (ValueError, TypeError, AttributeError) as exc:
            raise err(errno.EINVAL, str(exc)) from None
        target = await self.resolve_target(target, errno.EPERM, publish=True)
        ref = Ref(volume_id, target, subpath, readonly, pod_namespace, pod_name)
        async with self.volume_locks.hold(volume_id), self.target_locks.hold(target):
            if single_writer:
                self._refuse_second_target(volume_id, target)
            answer = await self._publish_locked(key, ref, secrets)
        self.publishes.add()
        if answer["daemon_started"] is not None:
            log.info(
                "published",
                extra=fields(volume_id=volume_id, target=target, key_id=key.id, readonly=readonly),
            )
        return {**answer, "daemon_started": bool(answer["daemon_started"])}

    def _refuse_second_target(self, volume_id: str, target: str) -> None:
        """SINGLE_NODE_SINGLE_WRITER: one target per node (caller holds the volume lock)."""
        for entry in self.table.entries.values():
            for ref in entry.refs.values():
                if ref.volume_id == volume_id and ref.target != target:
                    raise err(
                        errno.EBUSY,
                        f"volume {volume_id!r} is single-writer and already published at "
                        f"{ref.target}",
                    )

    async def _publish_locked(self, key: Key, ref: Ref, secrets: dict[str, str]) -> dict:
        """The publish under its volume and target locks; daemon_started None: the target
        was published already and nothing changed."""
        target = ref.target
        found = self.table.by_target(target)
        if found is not None:
            entry, old = found
            if entry.key != key or old != ref:
                raise err(
                    errno.EEXIST,
                    f"target {target} already holds volume {old.volume_id} "
                    f"(subpath {old.subpath}, readonly {old.readonly}, key {entry.key.id})",
                )
            # a dead daemon's mount keeps its fstype and device: ask for a live one too
            if self._bound(entry, ref) and self._live_mount(entry):
                return {**self._answer(entry), "daemon_started": None}
        elif mounts.top_mount(target) is not None:
            raise err(errno.EEXIST, f"target {target} is already a mount point")
        async with self.key_locks.hold(key.id):
            try:
                entry, started = await self._ensure_daemon(key, secrets)
                if found is not None and self._bound(entry, ref):
                    return {**self._answer(entry), "daemon_started": started}  # re-bound
                # published before but its mount is gone or dead: the bind goes on top
                await self._bind(entry, ref)
            except BaseException:
                unused = self.table.entries.get(key.id)
                if unused is not None and not unused.refs:
                    with trio.CancelScope(shield=True):
                        await self._release(unused)
                raise
            entry.refs[target] = ref
            self.key_state(key.id).broken_targets.pop(target, None)
            await self.persist()
        return {**self._answer(entry), "daemon_started": started}

    def _answer(self, entry: Entry) -> dict:
        return {"key": entry.key.id, "mountpoint": entry.mountpoint}

    def _bound(self, entry: Entry, ref: Ref) -> bool:
        """The target shows the key's current mount at the ref's subpath."""
        top, source = mounts.top_mounts(ref.target, entry.mountpoint)
        if not self._serves(entry, top, source):
            return False
        # a daemon's mount may itself show a directory of its filesystem (a bind, --subdir)
        return top.root == source.root.rstrip("/") + "/" + ref.subpath

    def _serves(self, entry: Entry, top, source) -> bool:
        """`top` is a bind of the daemon's live mount `source` (same device), not a dead one."""
        fstype = self.engine_of(entry).fstype
        return (
            mounts.is_mount_of(top, fstype) and source is not None and top.device == source.device
        )

    async def _ensure_daemon(self, key: Key, secrets: dict[str, str]) -> tuple[Entry, bool]:
        """The key's entry with a running daemon (caller holds the key lock).

        The kept secrets (used to restart the daemon later) are replaced only by ones that
        are known to work, so one request with a stale secret cannot break later recoveries.
        """
        state = self.key_state(key.id)
        state.linger_gen += 1  # a pending linger stop no longer applies
        entry = self.table.entries.get(key.id)
        if entry is not None and self._live_mount(entry):
            if secrets and secrets_digest(key.id, secrets) != entry.secrets_digest:
                if await self._cluster_error(entry, secrets) is None:
                    await self._save_secrets(entry, secrets)
                    await self.persist()
            return entry, False
        if entry is None:
            entry = Entry(key, os.path.join(self.mounts_dir, key.id))
            self.table.entries[key.id] = entry
            await self._start_daemon(entry, secrets)
        else:
            await self._recover(entry, "daemon not running at publish", secrets or None)
        return entry, True

    async def _bind(self, entry: Entry, ref: Ref) -> bool:
        """Bind `mountpoint/subpath` on top of whatever the target shows.

        Never unmounts first (a dead mount stays underneath until unpublish), so a missing
        source leaves the target as it was, never an empty local directory. True when the
        target had MAX_LAYERS and was reset instead (containers then keep the dead copy).
        """
        fstype = self.engine_of(entry).fstype
        if not mounts.is_mount_of(mounts.top_mount(entry.mountpoint), fstype):
            raise err(errno.EIO, f"{entry.mountpoint} is not a live {fstype} mount")
        created = await self._make_target(ref.target)
        below = mounts.stack_at(ref.target)
        reset = len(below) >= MAX_LAYERS
        if reset:
            log.warning("too many stacked mounts; resetting", extra=fields(target=ref.target))
        bind = OwnedBind(partial(mounts.bind_beneath, replace=reset), ref.target)
        try:
            await self._blocking(bind, entry.mountpoint, ref.subpath, ref.target)
        except BaseException as exc:
            if bind.abandon():  # it bound, but we no longer wait for it: undo it here
                with trio.CancelScope(shield=True), contextlib.suppress(OSError):
                    await self._blocking(bind.undo)
            if not isinstance(exc, OSError):
                raise
            if created:
                with contextlib.suppress(OSError):
                    os.rmdir(ref.target)
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                raise err(
                    errno.ENOENT,
                    f"subpath {ref.subpath!r} is missing under {entry.key.fs_path} "
                    f"on {entry.key.address}: {exc.strerror}",
                ) from None
            raise
        try:
            if not self._bound(entry, ref):
                raise err(errno.EIO, f"bind onto {ref.target} did not produce the expected mount")
            if ref.readonly:
                await self._blocking(mounts.remount_readonly, ref.target)
        except BaseException:
            keep = below[-1].mount_id if below and not reset else None
            with trio.CancelScope(shield=True):
                await self._blocking(mounts.unmount_above, ref.target, keep)  # ours only
            raise
        return reset

    async def _make_target(self, target: str) -> bool:
        """Create the target directory (CSI: the plugin creates it); True if we made it."""

        def make() -> bool:
            # kubelet makes the parent; making it here too costs nothing and stays inside
            # the kubelet dir (its existing part was resolved already)
            os.makedirs(os.path.dirname(target), 0o750, exist_ok=True)
            try:
                os.mkdir(target, 0o750)
                return True
            except FileExistsError:
                if mounts.top_mount(target) is not None:
                    return False  # a mount, maybe dead (lstat fails): the bind goes on top
                info = os.lstat(target)
                if not stat.S_ISDIR(info.st_mode):
                    raise err(errno.EEXIST, f"target {target} is not a directory") from None
                return False

        return await self._blocking(make)

    # ------------------------------------------------------------ unpublish

    async def unpublish(self, volume_id, target) -> dict:
        if not isinstance(volume_id, str) or not volume_id:
            raise err(errno.EINVAL, "volume_id is empty")
        target = await self.resolve_target(target, errno.EINVAL)
        async with self.volume_locks.hold(volume_id), self.target_locks.hold(target):
            found = self.table.by_target(target)
            if found is None:
                # a leftover of ours (mountd died between bind and persist) is still ours
                if self._leftover_bind(mounts.top_mount(target)):
                    await self._unmount(target)
                await self._remove_target(target)
                return {"removed": False}
            entry, ref = found
            if ref.volume_id != volume_id:
                raise err(
                    errno.EINVAL, f"target {target} holds volume {ref.volume_id}, not {volume_id}"
                )
            async with self.key_locks.hold(entry.key.id):
                await self._unmount(target)
                del entry.refs[target]
                state = self.key_state(entry.key.id)
                state.broken_targets.pop(target, None)
                state.told_broken.discard(target)
                await self.persist()
                if not entry.refs:
                    await self._release(entry)
            await self._remove_target(target)
        self.unpublishes.add()
        log.info(
            "unpublished", extra=fields(volume_id=volume_id, target=target, key_id=entry.key.id)
        )
        return {"removed": True}

    async def _unmount(self, path: str, *, lazy: bool = False) -> None:
        await self._blocking(partial(mounts.unmount_all, path, lazy=lazy))

    async def _remove_target(self, target: str) -> None:
        """CSI: the plugin removes the target it created; an empty directory only."""
        if mounts.top_mount(target) is not None:
            return
        with contextlib.suppress(OSError):
            await self._blocking(os.rmdir, target)
