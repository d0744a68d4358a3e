"""What the daemon tells the kernel: mount options, and the mount's read-ahead window."""

from __future__ import annotations

import logging
import os

from fusecsi.logs import fields

log = logging.getLogger(__name__)

FS_SUBTYPE = "fusecsi"  # the mount shows as fs type fuse.fusecsi


def fsname(master_addrs: str, fs_path: str) -> str:
    return f"fusecsi:{master_addrs}:{fs_path}"


def fuse_options(master_addrs: str, fs_path: str, options) -> set[str]:
    # libfuse splits its option string at commas; a backslash keeps one inside a value.
    name = fsname(master_addrs, fs_path).replace("\\", "\\\\").replace(",", "\\,")
    out = {f"fsname={name}", f"subtype={FS_SUBTYPE}", "noatime"}
    if options["default-permissions"]:
        out.add("default_permissions")
    if options["allow-other"]:
        out.add("allow_other")
    if options["read-only"]:
        out.add("ro")
    return out


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_device(mountpoint: str, mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """`major:minor` of the last mount at `mountpoint` (read without touching the mount)."""
    # realpath of the mountpoint itself would stat the mount: a deadlock from inside the daemon
    parent, name = os.path.split(os.path.abspath(mountpoint))
    target = os.path.join(os.path.realpath(parent), name)
    found = None
    with open(mountinfo) as f:
        for line in f:
            parts = line.split()
            if len(parts) > 4 and _unescape(parts[4]) == target:
                found = parts[2]
    return found


def set_read_ahead(mountpoint: str, kib: int) -> None:
    """Raise the kernel's read-ahead for this mount, so sequential reads come in large
    requests (FUSE's default of 128 KiB means 256 KiB reads at best)."""
    device = mount_device(mountpoint)
    if device is None:
        log.warning("mount not found in mountinfo", extra=fields(mountpoint=mountpoint))
        return
    path = f"/sys/class/bdi/{device}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(str(kib))
    except OSError as exc:
        log.warning("cannot set read-ahead", extra=fields(path=path, err=str(exc)))
