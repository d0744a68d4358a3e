"""The write path never loses or invents acknowledged data (issue 14 items 1, 2, 6).

What write, fsync and close promise is in README.md ("Data path, caches and durability"):
an fsync'd byte is read back exactly; a failed write changes nothing visible; once data this
open file acknowledged could not be stored, every later fsync and the close report it; the
length published to the cluster never covers bytes that were not stored.
"""

from __future__ import annotations

import os
import subprocess
import sys

from fusemounts import run_cluster

LINES = 150
# The observer: stat, read and list the file as fast as it can, until its stdin closes.
OBSERVER = """
import os, select, sys
path = sys.argv[1]
while not select.select([sys.stdin], [], [], 0)[0]:
    try:
        os.stat(path)
        with open(path, "rb") as f:
            f.read()
        os.listdir(os.path.dirname(path))
    except FileNotFoundError:
        pass
"""


def _line(i: int) -> bytes:
    return b"line %05d %s\n" % (i, b"x" * (i % 37))


async def _read_path(client, path: str) -> bytes:
    attr = await client.resolve(path)
    return await client.read(attr.ino, 0, attr.size + 1)


def test_fsynced_appends_survive_a_concurrent_observer(mnt):
    """Item 1: a second process statting, reading and listing the file while one appends with
    O_APPEND + fsync must not make the kernel's size go backwards (a later line landing on an
    earlier one)."""
    path = mnt / "log"
    path.write_bytes(b"")
    observer = subprocess.Popen([sys.executable, "-c", OBSERVER, str(path)], stdin=subprocess.PIPE)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            for i in range(LINES):
                os.write(fd, _line(i))
                os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        observer.stdin.close()
        observer.wait(30)
    want = b"".join(_line(i) for i in range(LINES))
    assert path.read_bytes() == want
    got = run_cluster(_read_path, mnt.master_addrs, f"{mnt.fs_path}/log")
    assert got == want
