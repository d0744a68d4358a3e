"""What a process holding things open on a JuiceFS volume sees, one probe at a time.

`held_probe.py DIR`: in DIR it writes `held` and `mapped`, keeps `held` open for reading,
`log` open for appending (each record fsync'd), `mapped` mapped, and its cwd in DIR. It
prints READY, then for each `probe` line on stdin prints one JSON line: per kind ("held",
"cwd", "mmap", "appender") "ok" or the error, and the seconds the probe took. Pages are
dropped first, so reads reach the daemon. The mmap is read in a forked child: a fault the
daemon cannot serve is a SIGBUS, which must not end the prober. On `quit` it checks that
`log` holds exactly the records whose fsync answered, prints that as a last JSON line and
exits.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import signal
import sys
import time

RECORD = 16
SIZE = 1 << 20


def data(size: int) -> bytes:
    return b"".join(b"%015d\n" % i for i in range(size // RECORD))


def record(n: int) -> bytes:
    return b"%015d\n" % n


class Signalled(Exception):
    """The forked reader died of this signal (a SIGBUS: a fault the mount did not serve)."""


def outcome(fn) -> str:
    try:
        fn()
        return "ok"
    except Signalled as exc:
        return str(exc)
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc))
    except AssertionError as exc:
        return f"wrong: {exc}"


def main() -> None:
    os.chdir(sys.argv[1])
    content = data(SIZE)
    for name in ("held", "mapped"):
        with open(name, "wb") as f:
            f.write(content)
            os.fsync(f.fileno())
    held = os.open("held", os.O_RDONLY)
    log = os.open("log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    mapped = os.open("mapped", os.O_RDONLY)
    view = mmap.mmap(mapped, SIZE, prot=mmap.PROT_READ)
    synced = []  # records whose write and fsync both answered
    rounds = 0

    def read_held():
        os.posix_fadvise(held, 0, 0, os.POSIX_FADV_DONTNEED)
        offset = (rounds * 4096 * 13) % SIZE
        got = os.pread(held, 4096, offset)
        assert got == content[offset : offset + 4096], "held file read back other bytes"

    def through_cwd():
        os.stat("held")
        assert "held" in os.listdir("."), "listing lost a name"
        with open("mapped", "rb") as f:
            assert f.read(64) == content[:64], "read through cwd gave other bytes"

    def fault_mmap():
        view.madvise(mmap.MADV_DONTNEED)
        os.posix_fadvise(mapped, 0, 0, os.POSIX_FADV_DONTNEED)
        page = (rounds * 7919 % (SIZE // 4096)) * 4096
        child = os.fork()
        if child == 0:
            os._exit(0 if view[page : page + 64] == content[page : page + 64] else 3)
        _, status = os.waitpid(child, 0)
        if os.WIFSIGNALED(status):
            raise Signalled(signal.Signals(os.WTERMSIG(status)).name)
        assert os.WEXITSTATUS(status) == 0, "mapped page read back other bytes"

    def append():
        n = len(synced)
        os.write(log, record(n))
        os.fsync(log)
        synced.append(n)

    print("READY", flush=True)
    for line in sys.stdin:
        if line.strip() == "quit":
            break
        rounds += 1
        result = {}
        for kind, fn in (
            ("held", read_held),
            ("cwd", through_cwd),
            ("mmap", fault_mmap),
            ("appender", append),
        ):
            start = time.monotonic()
            result[kind] = outcome(fn)
            result[kind + "_seconds"] = round(time.monotonic() - start, 3)
        print(json.dumps(result), flush=True)
    view.close()
    for fd in (held, mapped):
        os.close(fd)
    closed = outcome(lambda: os.close(log))
    with open("log", "rb") as f:
        kept = f.read()
    expected = b"".join(record(n) for n in range(len(synced)))
    print(json.dumps({"close": closed, "log_exact": kept == expected, "synced": len(synced)}))


if __name__ == "__main__":
    main()
