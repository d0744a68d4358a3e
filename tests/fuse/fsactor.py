"""One process of the model-based test (tests/fuse/test_model.py).

Run as a script it reads JSON commands from stdin (`[op, args...]`) and answers each with
one JSON line, `{"ok": result}` or `{"errno": "ENAME"}`: the test drives several such
processes on real mounts. The test applies the same `Actor` to its local model directory
in-process, so both sides run the very same system calls. `fsactor.py --noise ROOT` only
looks at files, to race with the others.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import select
import subprocess
import sys
import time

FLAGS = {
    "r": os.O_RDONLY,
    "w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
    "a": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
    "rw": os.O_RDWR | os.O_CREAT,
}


class ActorProcess:
    """This module run as a process on `root`, driven one command at a time."""

    def __init__(self, root, timeout: float = 120.0) -> None:
        self.timeout = timeout
        self.proc = subprocess.Popen(
            [sys.executable, __file__, str(root)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def __call__(self, op: str, *args):
        self.proc.stdin.write(json.dumps([op, *args]) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
        if not ready:
            raise AssertionError(f"{op}{args[:2]} hung for {self.timeout:.0f} s")
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def pack(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unpack(text: str) -> bytes:
    return base64.b64decode(text)


class Actor:
    """File operations on names below `root`; open files are numbered handles."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.fds: dict[int, int] = {}
        self._next = 1

    def do(self, op: str, *args):
        try:
            return {"ok": getattr(self, "op_" + op)(*args)}
        except OSError as exc:
            return {"errno": errno.errorcode.get(exc.errno, str(exc.errno))}

    def _path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def op_chroot(self, root: str) -> None:
        self.root = root

    def op_open(self, name: str, flags: str) -> int:
        fd = os.open(self._path(name), FLAGS[flags], 0o644)
        handle, self._next = self._next, self._next + 1
        self.fds[handle] = fd
        return handle

    def op_write(self, handle: int, data: str) -> int:
        return os.write(self.fds[handle], unpack(data))

    def op_pwrite(self, handle: int, offset: int, data: str) -> int:
        return os.pwrite(self.fds[handle], unpack(data), offset)

    def op_pread(self, handle: int, offset: int, size: int) -> str:
        return pack(os.pread(self.fds[handle], size, offset))

    def op_fsync(self, handle: int) -> None:
        os.fsync(self.fds[handle])

    def op_fstat(self, handle: int) -> list[int]:
        st = os.fstat(self.fds[handle])
        return [st.st_size, st.st_nlink]

    def op_close(self, handle: int) -> None:
        os.close(self.fds.pop(handle))  # the descriptor is gone even when close fails

    def op_forget(self) -> None:
        """Drop every handle (their mount died); errors do not matter."""
        for fd in self.fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds.clear()

    def op_read(self, name: str) -> str:
        with open(self._path(name), "rb") as f:
            return pack(f.read())

    def op_stat(self, name: str) -> int:
        return os.stat(self._path(name)).st_size

    def op_listdir(self, name: str) -> list[str]:
        return sorted(os.listdir(self._path(name)))

    def op_truncate(self, name: str, size: int) -> None:
        os.truncate(self._path(name), size)

    def op_rename(self, old: str, new: str) -> None:
        os.rename(self._path(old), self._path(new))

    def op_unlink(self, name: str) -> None:
        os.unlink(self._path(name))

    def op_mkdir(self, name: str) -> None:
        os.mkdir(self._path(name))


def noise(root: str) -> None:
    """Look at every file below `root` over and over (stat, a read, a listing) and ignore
    the answers: the other processes' operations race with these lookups."""
    while True:
        for top, _, files in os.walk(root):
            for name in files:
                try:
                    with open(os.path.join(top, name), "rb") as f:
                        os.fstat(f.fileno())
                        f.read(4096)
                except OSError:
                    pass
        time.sleep(0.002)


def main() -> None:
    if sys.argv[1] == "--noise":
        noise(sys.argv[2])
        return
    actor = Actor(sys.argv[1])
    for line in sys.stdin:
        op, *args = json.loads(line)
        sys.stdout.write(json.dumps(actor.do(op, *args)) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
