"""Running the `juicefs` command line: bounded, secret only in the environment, and its
errors turned into one-line OSErrors with an errno."""

from __future__ import annotations

import errno
import os
import re

import trio

from fusecsi.engines.base import Unreachable
from fusecsi.engines.juicefs.metaurl import MetaURL, binary

# juicefs logs "2026/01/01 00:00:00.000000 juicefs[42] <FATAL>: message [func@file.go:12]"
_LOG_LINE = re.compile(r"<(FATAL|ERROR)>: (.*?)(?: \[[^\]]*\])?\s*$")
_ERRNOS = (
    ("no such file or directory", errno.ENOENT),
    ("not a directory", errno.ENOTDIR),
    ("file exists", errno.EEXIST),
    ("permission denied", errno.EACCES),
    ("operation not permitted", errno.EPERM),
    ("wrongpass", errno.EACCES),
    ("noauth", errno.EACCES),
    ("invalid password", errno.EACCES),
    ("not formatted", errno.EINVAL),
)
_UNREACHABLE = ("connection refused", "i/o timeout", "no route to host", "dial tcp", "timeout")


def environment(meta: MetaURL) -> dict[str, str]:
    """A minimal environment for `juicefs` plus the metadata password (nothing else of ours:
    the caller's environment may hold other secrets)."""
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
    env["HOME"] = os.environ.get("HOME", "/")
    env.update(meta.env)
    return env


def error_of(what: str, stderr: bytes, address: str) -> OSError:
    """The OSError a failed `juicefs` command stands for (its last FATAL/ERROR line)."""
    message = ""
    for line in stderr.decode(errors="replace").splitlines():
        match = _LOG_LINE.search(line)
        if match:
            message = match.group(2)
    if not message:
        lines = stderr.decode(errors="replace").strip().splitlines()
        message = lines[-1] if lines else "failed without a message"
    lowered = message.lower()
    if any(mark in lowered for mark in _UNREACHABLE):
        return Unreachable(f"JuiceFS metadata {address} does not answer: {message}")
    for mark, code in _ERRNOS:
        if mark in lowered:
            return OSError(code, f"juicefs {what}: {message}")
    return OSError(errno.EIO, f"juicefs {what}: {message}")


async def run(meta: MetaURL, args: list[str], *, seconds: float) -> str:
    """Run `juicefs args…` within `seconds`; its stdout, or the OSError it means."""
    with trio.move_on_after(seconds) as scope:
        result = await trio.run_process(
            [binary(), *args],
            env=environment(meta),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    if scope.cancelled_caught:
        raise Unreachable(f"JuiceFS metadata {meta.public} did not answer within {seconds:g}s")
    if result.returncode != 0:
        raise error_of(args[0] if args else "", result.stderr, meta.public)
    return result.stdout.decode(errors="replace")
