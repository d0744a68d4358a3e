"""Which inode a statfs is about: pyfuse3 drops it, so df in a volume could not show its quota.

The kernel sends FUSE_STATFS for the inode of the path asked about (a pod's bind mount of its
volume's directory asks for that directory) and libfuse hands it to the session's statfs
handler, but pyfuse3's handler calls `Operations.statfs(ctx)` without it. `install()` puts a
small ctypes handler in front of pyfuse3's in the session's own copy of the handler table: it
notes the inode and calls pyfuse3's handler, which starts the request's coroutine; that
coroutine runs up to its first await before any other request is read (trio switches tasks
only at awaits), so `Operations.statfs` picks the noted inode up as its first step.

The handler table is found through pyfuse3's (unexported, not stripped) symbols and checked
against pyfuse3's own statfs handler; if anything does not match, nothing is patched and
statfs answers for the mount's root (fs-path), as before.
"""

from __future__ import annotations

import ctypes
import logging
import os
import struct

import pyfuse3

from fusecsi.logs import fields

log = logging.getLogger(__name__)

SESSION = b"__pyx_v_7pyfuse3_session"  # struct fuse_session *
OPS = b"__pyx_v_7pyfuse3_fuse_ops"  # the struct fuse_lowlevel_ops given to fuse_session_new
STATFS = b"__pyx_f_7pyfuse3_fuse_statfs"  # pyfuse3's statfs handler
STATFS_SLOT = 24  # init, destroy, lookup, ... fsyncdir, statfs: stable libfuse 3 ABI
PTR = 8
SEARCH = 512  # bytes of struct fuse_session searched for its copy of the table

_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64)
_ORIGINAL = ctypes.PYFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64)  # keeps the GIL


class StatfsInode:
    """`take()`: the kernel inode of the statfs being served (None when unknown)."""

    def __init__(self) -> None:
        self._ino: int | None = None
        self._keep = None  # the installed handler must outlive the session
        self._tried = False

    def take(self) -> int | None:
        ino, self._ino = self._ino, None
        return ino

    def install(self) -> None:
        """Once per daemon, when the session exists (at FUSE_INIT, or at the first statfs of
        a daemon that took over a session already set up)."""
        if self._tried:
            return
        self._tried = True
        try:
            table = _session_table(pyfuse3.__file__)
        except Exception as exc:  # never fatal: statfs then answers for fs-path
            log.warning("statfs will not know its inode", extra=fields(err=repr(exc)))
            return
        original = _ORIGINAL(ctypes.c_void_p.from_address(table).value)

        def handler(req, ino):
            self._ino = ino
            original(req, ino)

        self._keep = _HANDLER(handler)
        ctypes.c_void_p.from_address(table).value = ctypes.cast(self._keep, ctypes.c_void_p).value


def _session_table(path: str) -> int:
    """Address of the statfs slot in the live session's handler table."""
    symbols = _symbols(path, {SESSION, OPS, STATFS})
    if len(symbols) != 3:
        raise ValueError("pyfuse3's symbols are not there (stripped?)")
    base = _load_base(path)
    ops = base + symbols[OPS]
    statfs = ctypes.c_void_p.from_address(ops + STATFS_SLOT * PTR).value
    if statfs != base + symbols[STATFS]:
        raise ValueError("pyfuse3's handler table has another layout")
    session = ctypes.c_void_p.from_address(base + symbols[SESSION]).value
    if not session:
        raise ValueError("no FUSE session yet")
    head = ctypes.string_at(ops, (STATFS_SLOT + 1) * PTR)
    for offset in range(0, SEARCH, PTR):
        if ctypes.string_at(session + offset, len(head)) == head:
            return session + offset + STATFS_SLOT * PTR
    raise ValueError("the session's handler table was not found")


def _load_base(path: str) -> int:
    real = os.path.realpath(path)
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5] == real and int(fields[2], 16) == 0:
                return int(fields[0].split("-")[0], 16)
    raise ValueError(f"{real} is not loaded")


def _symbols(path: str, wanted: set[bytes]) -> dict[bytes, int]:
    """Values of the `wanted` symbols in an ELF64 little-endian file's .symtab."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:6] != b"\x7fELF\x02\x01":
        raise ValueError("not a 64-bit little-endian ELF file")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [
        struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)
    ]
    out = {}
    for _, kind, _, _, offset, size, link, _, _, entsize in sections:
        if kind != 2:  # SHT_SYMTAB
            continue
        strings = sections[link][4]
        for at in range(offset, offset + size, entsize):
            name, _, _, _, value, _ = struct.unpack_from("<IBBHQQ", data, at)
            end = data.index(b"\0", strings + name)
            symbol = data[strings + name : end]
            if symbol in wanted:
                out[symbol] = value
    return out
