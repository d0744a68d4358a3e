"""Kernel mount state and the mount syscalls mountd makes.

Everything here is synchronous; mountd calls it from worker threads. Whether a path is a
mount point is always answered from /proc/self/mountinfo, never by touching the path, so a
dead FUSE mount cannot hang the question.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import re
from dataclasses import dataclass

MS_RDONLY = 0x1
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8
MAX_STACK = 64

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_void_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]

_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


@dataclass(frozen=True)
class MountEntry:
    mount_id: int
    parent_id: int
    device: str
    root: str
    mountpoint: str
    options: str
    fstype: str
    source: str

    @property
    def readonly(self) -> bool:
        return "ro" in self.options.split(",")


def parse_mountinfo(text: str) -> list[MountEntry]:
    entries = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields = left.split(" ")
        tail = right.split(" ")
        if len(fields) < 6 or len(tail) < 2:
            continue
        entries.append(
            MountEntry(
                mount_id=int(fields[0]),
                parent_id=int(fields[1]),
                device=fields[2],
                root=_unescape(fields[3]),
                mountpoint=_unescape(fields[4]),
                options=fields[5],
                fstype=tail[0],
                source=_unescape(tail[1]),
            )
        )
    return entries


def _mountinfo_text() -> str:
    with open("/proc/self/mountinfo") as f:
        return f.read()


def read_mountinfo() -> list[MountEntry]:
    return parse_mountinfo(_mountinfo_text())


def _escape(path: str) -> str:
    return (
        path.replace("\\", "\\134")
        .replace(" ", "\\040")
        .replace("\t", "\\011")
        .replace("\n", "\\012")
    )


def top_mount(path: str, entries: list[MountEntry] | None = None) -> MountEntry | None:
    """The visible (last stacked) mount at exactly `path`, or None when it is no mount point."""
    if entries is None:
        return top_mounts(path)[0]
    found = None
    for entry in entries:
        if entry.mountpoint == path:
            found = entry
    return found


def stack_at(path: str) -> list[MountEntry]:
    """Every mount stacked at exactly `path`, bottom first."""
    needle = f" {_escape(path)} "
    lines = [line for line in _mountinfo_text().splitlines() if needle in line]
    return [e for e in parse_mountinfo("\n".join(lines)) if e.mountpoint == path]


def top_mounts(*paths: str) -> list[MountEntry | None]:
    """`top_mount` of several paths from one read of mountinfo."""
    # a node can hold thousands of mounts: parse only the lines that can match
    needles = [f" {_escape(path)} " for path in paths]
    lines = [line for line in _mountinfo_text().splitlines() if any(n in line for n in needles)]
    entries = parse_mountinfo("\n".join(lines))
    return [top_mount(path, entries) for path in paths]


def mounts_under(base: str, entries: list[MountEntry] | None = None) -> list[MountEntry]:
    """Mounts at `base` or below it, deepest first (the order to unmount them in)."""
    prefix = base.rstrip("/") + "/"
    found = [
        e
        for e in (read_mountinfo() if entries is None else entries)
        if e.mountpoint == base or e.mountpoint.startswith(prefix)
    ]
    return sorted(found, key=lambda e: (-e.mountpoint.count("/"), -e.mount_id))


def _check(result: int, what: str, path: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what} {path}: {os.strerror(code)}")


def bind(source: str, target: str) -> None:
    _check(
        _libc.mount(os.fsencode(source), os.fsencode(target), None, MS_BIND, None), "bind", target
    )


def open_beneath(base: str, subpath: str) -> int:
    """An O_PATH fd of directory `base/subpath`, refusing any symlink below `base`.

    Binding through this fd (instead of the path) means a symlink planted in the cluster
    cannot redirect the bind to a host directory, not even between a check and the mount.
    """
    fd = os.open(base, os.O_PATH | os.O_DIRECTORY)
    try:
        for part in subpath.split("/"):
            if part in ("", ".", ".."):
                raise OSError(errno.EINVAL, f"bad path segment {part!r} in {subpath!r}")
            try:
                child = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as exc:
                if exc.errno == errno.ENOTDIR:
                    raise OSError(
                        errno.ENOTDIR, f"{subpath!r}: {part!r} is not a directory"
                    ) from None
                raise
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def bind_beneath(base: str, subpath: str, target: str, *, replace: bool = False) -> None:
    """Bind directory `base/subpath` onto directory `target` (neither through a symlink).

    The bind goes on top of whatever is mounted at `target` (a dead mount stays underneath).
    With `replace`, every mount at `target` is removed first, but only once the source was
    found: a missing source leaves the target as it was.
    """
    source_fd = open_beneath(base, subpath)
    try:
        if replace:
            unmount_all(target, lazy=True)
        target_fd = os.open(target, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            source, dest = f"/proc/self/fd/{source_fd}", f"/proc/self/fd/{target_fd}"
            result = _libc.mount(source.encode(), dest.encode(), None, MS_BIND, None)
            _check(result, "bind", target)
        finally:
            os.close(target_fd)
    finally:
        os.close(source_fd)


# Per-mount flags a bind remount would otherwise clear (the call sets them all at once).
KEPT_FLAGS = {
    "nosuid": 0x2,
    "nodev": 0x4,
    "noexec": 0x8,
    "noatime": 0x400,
    "nodiratime": 0x800,
    "relatime": 0x200000,
    "strictatime": 0x1000000,
}


def remount_readonly(target: str) -> None:
    """Make the bind at `target` read-only, keeping nosuid, nodev and the other flags."""
    entry = top_mount(target)
    if entry is None:
        raise OSError(errno.EINVAL, f"remount ro {target}: not a mount point")
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY
    for name in entry.options.split(","):
        flags |= KEPT_FLAGS.get(name, 0)
    _check(_libc.mount(None, os.fsencode(target), None, flags, None), "remount ro", target)


def umount(path: str, *, lazy: bool = False) -> None:
    flags = UMOUNT_NOFOLLOW | (MNT_DETACH if lazy else 0)
    _check(_libc.umount2(os.fsencode(path), flags), "umount", path)


def unmount_all(path: str, *, lazy: bool = False) -> int:
    """Unmount `path` until it is no mount point any more (stacked mounts included).

    A plain unmount that fails (busy, a dead FUSE connection) falls back to a lazy one.
    Returns how many mounts were removed.
    """
    removed = 0
    while top_mount(path) is not None:
        if removed >= MAX_STACK:
            raise OSError(errno.EBUSY, f"{path} is still a mount point after {removed} unmounts")
        try:
            umount(path, lazy=lazy)
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.ENOENT) and top_mount(path) is None:
                break  # someone else unmounted it meanwhile
            if lazy:
                raise
            umount(path, lazy=True)
        removed += 1
    return removed


def unmount_above(path: str, keep: int | None) -> None:
    """Unmount the layers stacked at `path` above the mount with id `keep` (all if None)."""
    for _ in range(MAX_STACK):
        top = top_mount(path)
        if top is None or top.mount_id == keep:
            return
        try:
            umount(path)
        except OSError:
            umount(path, lazy=True)
    raise OSError(errno.EBUSY, f"{path} still has layers above mount {keep}")


def is_mount_of(entry: MountEntry | None, fstype: str) -> bool:
    """`entry` is a mount of the engine whose live mounts show `fstype` (NodeEngine.fstype)."""
    return entry is not None and entry.fstype == fstype
