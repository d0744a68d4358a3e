"""The volume rules, written once on engines.base.Namespace for every engine.

A volume is one directory, tagged `trusted.fusecsi.volume` = its volume id and
`trusted.fusecsi.owner` = the CreateVolume name holding it, with a quota. The volume id
carries a digest of the CreateVolume name, so a directory that a later volume got at the
same path (a PVC re-created under its old name) is not the old volume's. Release (delete /
archive / retain) touches nothing that does not carry the tag for that very volume, never
removes or renames a volume nested inside another, and a cluster that does not answer is an
error, never "already gone". Directories a path-pattern needs between fs-path and a volume
are born tagged `trusted.fusecsi.parent`; release by delete removes those, and only those,
again while they are empty.

`mkdir_tagged` is durable when it answers; every other change is followed by
`Namespace.sync` before the rule returns. An engine whose `mkdir_tagged` is not atomic
writes the volume tag first: a directory left with it alone is finished (owner, quota) by the
next CreateVolume; one left with no tag at all is never taken for ours.

Outcomes the caller must tell apart are the exceptions below (one-line messages); any
other failure is the Namespace's OSError (Unreachable when no server answered) or
trio.TooSlowError (a call past `call_timeout`).
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import trio

from fusecsi.csi.volumes import EMBEDDED, VolumeRef, join
from fusecsi.engines.base import Namespace, Node
from fusecsi.errors import run_all
from fusecsi.locks import KeyedLocks
from fusecsi.logs import fields

log = logging.getLogger("fusecsi.volume_rules")

TAG_VOLUME = b"trusted.fusecsi.volume"
TAG_OWNER = b"trusted.fusecsi.owner"
# on a directory between fs-path and a volume that fusecsi made for a path-pattern (value:
# the fs-path it was made below); release by delete removes it again once it is empty
TAG_PARENT = b"trusted.fusecsi.parent"
PARENT_MODE = 0o755
PARENT_ATTEMPTS = 4  # parents made again when a racing delete removed them meanwhile
VOLUME_MODE = 0o777  # pods run as any user; the volume is theirs alone
ARCHIVE_ATTEMPTS = 10  # archive names tried when one is taken (two archives in one second)


class RuleError(Exception):
    """A rule refused; the message is one line for the user."""


class AlreadyExists(RuleError):
    """The name or the path is taken by something that is not this volume."""


class Changed(RuleError):
    """The directory changed while being examined: retry."""


class Nesting(RuleError):
    """The volume would be inside another volume."""


class DeleteRefused(RuleError):
    """Release refused: the directory is not tagged for this volume, or holds another."""

    def __init__(self, ref: VolumeRef, volume_id: str, why: str) -> None:
        super().__init__(f"refusing to {ref.on_delete} {ref.path}: {why}; nothing was changed")
        self.why = why


class NoSuchVolume(RuleError):
    """No directory tagged for this volume."""


class CannotShrink(RuleError):
    """A quota smaller than the volume's."""


@dataclass(frozen=True)
class Ensured:
    capacity: int
    how: str  # "created", "adopted" (a retained or half-made directory), "exists"


def archive_name(name: str, now: float, attempt: int = 0) -> str:
    """`<name>.archived-<UTC time>[-<attempt>]`, the name shortened to stay within 255 bytes."""
    suffix = time.strftime(".archived-%Y%m%dT%H%M%SZ", time.gmtime(now))
    if attempt:
        suffix += f"-{attempt}"
    room = 255 - len(suffix)
    encoded = name.encode()
    if len(encoded) > room:
        name = encoded[:room].decode(errors="ignore")
    return name + suffix


def tag_ref(tag: bytes | None) -> VolumeRef | None:
    """The volume a directory's tag names, None when it names none."""
    try:
        return VolumeRef.from_volume_id(tag.decode()) if tag is not None else None
    except (ValueError, UnicodeDecodeError):
        return None


def _move_aside(ref: VolumeRef) -> str:
    """How a user moves a retained volume's directory out of the way."""
    if ref.engine == EMBEDDED:  # the admin command that ships with fusecsi
        return f"fusecsi fs --master-addrs {ref.address} mv {ref.path} {ref.path}.retained"
    return f"rename {ref.path} to {ref.path}.retained on the {ref.engine} cluster"


def fits(size: int, required: int, limit: int) -> bool:
    return (not required or size >= required) and (not limit or size <= limit)


def place(ref: VolumeRef) -> tuple[str, str, str]:
    """The lock for changes at `ref.path`. Volumes that could nest share their first path
    segment, so one lock for them makes create's nesting check and its mkdir one step."""
    return ref.engine, ref.address, ref.path.split("/")[1]


class VolumeRules:
    """The rules; one instance per controller (it holds the per-place locks). Each
    Namespace call is bounded by `call_timeout` (trio.TooSlowError past it)."""

    def __init__(self, *, call_timeout: float) -> None:
        self.call_timeout = call_timeout
        self._places = KeyedLocks()

    # -- plumbing ------------------------------------------------------------------------

    async def _in_time(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        with trio.fail_after(self.call_timeout):
            return await fn(*args)

    async def _together(self, *calls: tuple) -> list:
        """Independent Namespace calls at once (one round trip's wait instead of several);
        their results in order. The first failure is raised as itself, not as a group."""
        return await run_all([partial(self._in_time, *call) for call in calls])

    async def _changed_then_synced(self, ns: Namespace, fn, *args) -> None:
        """`fn(*args)`, then wait until the engine has it durable."""
        await self._in_time(fn, *args)
        await self._in_time(ns.sync)

    # -- reading -------------------------------------------------------------------------

    async def find(self, ns: Namespace, ref: VolumeRef) -> tuple[Node | None, bytes | None]:
        """(entry, volume tag) at the volume's path; None where missing."""
        entry = await self._in_time(ns.lookup, ref.path)
        if entry is None or not entry.is_dir:
            return entry, None
        return entry, await self._in_time(ns.get_tag, ref.path, TAG_VOLUME)

    async def existing(self, ns: Namespace, ref: VolumeRef) -> Node:
        """The volume's directory; NoSuchVolume unless it exists and is tagged for it."""
        volume_id = ref.volume_id()
        entry, tag = await self.find(ns, ref)
        if entry is None or tag != volume_id.encode():
            raise NoSuchVolume(f"volume {volume_id} does not exist")
        return entry

    async def _volume_at(self, ns: Namespace, path: str) -> bytes | None:
        """The volume tag of the directory at `path`; None when it is missing or untagged."""
        for attempt in range(PARENT_ATTEMPTS):
            entry = await self._in_time(ns.lookup, path)
            if entry is None or not entry.is_dir:
                return None
            try:
                return await self._in_time(ns.get_tag, path, TAG_VOLUME)
            except OSError as exc:
                # removed after it was looked up (an empty parent going with its last
                # volume): look again at what is at the path now
                if exc.errno != errno.ENOENT or attempt == PARENT_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    async def _refuse_nesting(self, ns: Namespace, ref: VolumeRef) -> None:
        """Nesting when a directory above the volume's is a volume: deleting or archiving
        that one would take this one with it."""
        parts = ref.path.split("/")[1:-1]
        above = ["/" + "/".join(parts[: i + 1]) for i in range(len(parts))]
        tags = await self._together(*[(self._volume_at, ns, path) for path in above])
        for path, tag in zip(above, tags, strict=True):
            if tag is not None:
                raise Nesting(
                    f"{ref.path} would be inside volume {tag.decode(errors='replace')} at "
                    f"{path}; give path-pattern a layout where volumes do not nest"
                )

    async def _volume_inside(self, ns: Namespace, path: str) -> str | None:
        """The path of a volume somewhere inside the directory at `path`, if any."""
        todo = [path]
        while todo:
            here = todo.pop()
            dirs = [node.path for node in await self._in_time(ns.listdir, here) if node.is_dir]
            tags = await self._together(*[(ns.get_tag, child, TAG_VOLUME) for child in dirs])
            for child, tag in zip(dirs, tags, strict=True):
                if tag is not None:
                    return child
                todo.append(child)
        return None

    # -- create --------------------------------------------------------------------------

    async def ensure(
        self,
        ns: Namespace,
        ref: VolumeRef,
        name: str,
        size: int,
        required: int = 0,
        limit: int = 0,
    ) -> Ensured:
        """The volume's directory exists, tagged for `ref` and held by the CreateVolume
        `name`, with a quota (`size` when made now)."""
        volume_id = ref.volume_id()
        # the volume tag first: an engine that tags one by one makes the directory ours first
        tags = {TAG_VOLUME: volume_id.encode(), TAG_OWNER: name.encode()}
        async with self._places.hold(place(ref)):
            await self._refuse_nesting(ns, ref)
            try:
                await self._make_volume(ns, ref, tags, size)
            except OSError as exc:
                if exc.errno != errno.EEXIST:
                    raise
                return await self._existing_volume(ns, ref, name, size, required, limit)
        log.info(
            "volume created",
            extra=fields(volume_id=volume_id, path=ref.path, capacity=size, name=name),
        )
        return Ensured(size, "created")

    async def _make_volume(self, ns: Namespace, ref: VolumeRef, tags: dict, size: int) -> None:
        for attempt in range(PARENT_ATTEMPTS):
            try:
                if attempt:
                    # the first volume under its parent, or a racing release (in another
                    # controller) removed a parent it had just left empty: make it (again)
                    await self._make_parents(ns, ref)
                await self._in_time(ns.mkdir_tagged, ref.path, VOLUME_MODE, tags, size)
                return
            except OSError as exc:
                if exc.errno != errno.ENOENT or attempt == PARENT_ATTEMPTS - 1:
                    raise

    async def _make_parents(self, ns: Namespace, ref: VolumeRef) -> None:
        """fs-path (untagged: the StorageClass's, never removed by fusecsi), then each
        directory between it and the volume that is missing, born tagged TAG_PARENT (no
        quota) so that release by delete may remove it when empty."""
        await self._in_time(ns.mkdirs, ref.fs_path)
        here = ref.fs_path
        for part in ref.subpath.split("/")[:-1]:
            path = join(here, part)
            try:
                await self._in_time(
                    ns.mkdir_tagged, path, PARENT_MODE, {TAG_PARENT: ref.fs_path.encode()}, None
                )
                log.info("parent directory created", extra=fields(path=path))
            except OSError as exc:
                if exc.errno != errno.EEXIST:  # there already, made by whoever: used as is
                    raise
            here = path

    async def _existing_volume(
        self, ns: Namespace, ref: VolumeRef, name: str, size: int, required: int, limit: int
    ) -> Ensured:
        """CreateVolume for a path that exists: the same volume again, a retained one, or a
        half-made one (an engine that tags after mkdir, interrupted)."""
        volume_id = ref.volume_id()
        entry = await self._in_time(ns.lookup, ref.path)
        if entry is None:
            raise Changed(f"{ref.path} changed while being created; retry")
        if not entry.is_dir:
            raise AlreadyExists(f"{ref.path} exists and is not a directory")
        tag, owner, quota = await self._together(
            (ns.get_tag, ref.path, TAG_VOLUME),
            (ns.get_tag, ref.path, TAG_OWNER),
            (ns.get_quota, ref.path),
        )
        if tag is None:
            raise AlreadyExists(f"{ref.path} exists and was not created by fusecsi")
        held = tag_ref(tag)
        ours = owner in (None, name.encode()) and held is not None and ref.same_but_digest(held)
        if ours and tag != volume_id.encode():
            # a retained volume's directory, or this one made under a version 1 id: tagged
            # for this volume first, so the old volume's release no longer matches it
            await self._changed_then_synced(
                ns, ns.set_tag, ref.path, TAG_VOLUME, volume_id.encode()
            )
            tag = volume_id.encode()
        if ours and owner is None:  # released by retain, or half made: adopt it
            await self._together(
                (ns.set_tag, ref.path, TAG_OWNER, name.encode()),
                (ns.set_quota, ref.path, size),
            )
            await self._in_time(ns.sync)
            log.info("volume adopted", extra=fields(volume_id=volume_id, path=ref.path, name=name))
            return Ensured(size, "adopted")
        if owner is not None and owner != name.encode():
            raise AlreadyExists(
                f"{ref.path} is in use by volume {owner.decode(errors='replace')!r}: a PV "
                f"kept by reclaimPolicy Retain (move its directory aside: {_move_aside(ref)}), "
                "or another claim on the same path (give path-pattern a placeholder that tells "
                "volumes apart)"
            )
        if tag != volume_id.encode():
            other = tag.decode(errors="replace")
            raise AlreadyExists(f"{ref.path} belongs to another volume ({other})")
        if quota is None:
            await self._changed_then_synced(ns, ns.set_quota, ref.path, size)
            return Ensured(size, "exists")
        if not fits(quota, required, limit):
            raise AlreadyExists(
                f"volume {name!r} exists with capacity {quota}, incompatible with "
                f"required {required} / limit {limit}"
            )
        return Ensured(quota, "exists")

    # -- expand --------------------------------------------------------------------------

    async def expand(
        self,
        ns: Namespace,
        ref: VolumeRef,
        target: int,
        *,
        on_failure: Callable[[BaseException], None] | None = None,
    ) -> int | None:
        """The volume's quota raised to `target` bytes; the quota it had (None: none).
        `on_failure` hears a failure of the change itself (not of finding the volume)."""
        async with self._places.hold(place(ref)):
            await self.existing(ns, ref)
            current = await self._in_time(ns.get_quota, ref.path)
            if current is not None and target < current:
                raise CannotShrink(f"cannot shrink volume from {current} to {target} bytes")
            if current != target:
                try:
                    await self._changed_then_synced(ns, ns.set_quota, ref.path, target)
                except Exception as exc:
                    if on_failure is not None:
                        on_failure(exc)
                    raise
                log.info(
                    "volume expanded",
                    extra=fields(volume_id=ref.volume_id(), old=current, new=target),
                )
        return current

    # -- release -------------------------------------------------------------------------

    async def release(self, ns: Namespace, ref: VolumeRef) -> str:
        """Apply the volume's on-delete policy; what happened: "deleted", "archived",
        "retained", or "gone" (nothing of that volume is there: nothing was changed but
        empty parents it left). DeleteRefused when the directory is not that volume's."""
        volume_id = ref.volume_id()
        async with self._places.hold(place(ref)):
            entry, tag = await self.find(ns, ref)
            if entry is None:
                log.info("volume already gone", extra=fields(volume_id=volume_id))
                # a call that failed after removing the volume: its empty parents too
                if ref.on_delete == "delete" and await self._remove_empty_parents(ns, ref):
                    await self._in_time(ns.sync)
                return "gone"
            if tag != volume_id.encode() and tag_ref(tag) is not None:
                # another volume has the directory now (its path was given again): the one
                # asked for is gone, and what is there is not ours to touch
                log.info(
                    "volume already gone; its directory belongs to another volume",
                    extra=fields(volume_id=volume_id, path=ref.path, tag=tag),
                )
                return "gone"
            if tag != volume_id.encode():
                why = (
                    "it carries no fusecsi tag"
                    if tag is None
                    else f"it is tagged {tag.decode(errors='replace')!r}, "
                    f"not as fusecsi volume {volume_id}"
                )
                raise DeleteRefused(ref, volume_id, why)
            if ref.on_delete != "retain":  # retain leaves the whole tree where it is
                nested = await self._volume_inside(ns, ref.path)
                if nested is not None:
                    raise DeleteRefused(ref, volume_id, f"volume {nested} is inside it")
            done = await self._apply_policy(ns, ref)
            if ref.on_delete == "delete":  # archive and retain leave a directory there
                await self._remove_empty_parents(ns, ref)
            await self._in_time(ns.sync)
        return done

    async def _apply_policy(self, ns: Namespace, ref: VolumeRef) -> str:
        volume_id = ref.volume_id()
        if ref.on_delete == "delete":
            await self._in_time(ns.remove_tree, ref.path)
            log.info("volume deleted", extra=fields(volume_id=volume_id, path=ref.path))
            return "deleted"
        if ref.on_delete == "archive":
            now = time.time()
            for attempt in range(ARCHIVE_ATTEMPTS):
                new_name = archive_name(ref.name, now, attempt)
                try:
                    await self._in_time(ns.rename, ref.path, join(ref.parent_path, new_name))
                    break
                except OSError as exc:  # that name is taken: the next one
                    if exc.errno != errno.EEXIST or attempt == ARCHIVE_ATTEMPTS - 1:
                        raise
            log.info(
                "volume archived",
                extra=fields(volume_id=volume_id, path=ref.path, archived_as=new_name),
            )
            return "archived"
        # retain: keep everything, release the directory for a later claim to adopt
        try:
            await self._in_time(ns.remove_tag, ref.path, TAG_OWNER)
        except OSError as exc:
            if exc.errno != errno.ENODATA:
                raise
        log.info("volume retained", extra=fields(volume_id=volume_id, path=ref.path))
        return "retained"

    async def _remove_empty_parents(self, ns: Namespace, ref: VolumeRef) -> int:
        """Bottom-up, each directory between the volume's and fs-path that fusecsi made
        (tagged TAG_PARENT) while it is empty; how many were removed. A directory not
        tagged, not empty (another volume, or a create racing this one) or gone ends the
        walk; fs-path and what is above it are never touched."""
        parts = ref.subpath.split("/")[:-1]
        removed = 0
        while parts:
            path = join(ref.fs_path, "/".join(parts))
            try:
                entry = await self._in_time(ns.lookup, path)
                if entry is None or not entry.is_dir:
                    break
                if await self._in_time(ns.get_tag, path, TAG_PARENT) is None:
                    break  # not made by fusecsi: never removed
                await self._in_time(ns.rmdir, path)
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT, errno.ENOTDIR):
                    break
                raise
            log.info("empty parent directory removed", extra=fields(path=path))
            removed += 1
            parts.pop()
        return removed

    # -- capacity ------------------------------------------------------------------------

    async def capacity(self, ns: Namespace, fs_path: str) -> int:
        """Bytes a new volume below `fs_path` could still get."""
        return await self._in_time(ns.capacity, fs_path)
