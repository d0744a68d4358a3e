"""Unix socket endpoints shared by the CSI servers and mountd's control API."""

from __future__ import annotations

import contextlib
import os
import socket
import stat

MAX_PATH = 107  # sun_path holds 108 bytes including the terminating NUL


def endpoint_path(endpoint: str) -> str:
    """`unix:///run/x.sock`, `unix://run/x.sock` (relative) or a plain path -> filesystem path."""
    if endpoint.startswith("unix://"):
        path = endpoint[len("unix://") :]
    elif "://" in endpoint:
        raise ValueError(f"unsupported endpoint {endpoint!r}: only unix:// sockets are served")
    else:
        path = endpoint
    if not path:
        raise ValueError("endpoint has no socket path")
    if len(os.fsencode(path)) > MAX_PATH:
        raise ValueError(f"socket path {path!r} is longer than {MAX_PATH} bytes")
    return path


def _answers(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def bind(path: str, backlog: int = 128) -> socket.socket:
    """A listening socket at `path`, mode 0600.

    The file appears only once the socket listens (it is bound under a temporary name and
    linked into place), so whoever waits for the path never meets a refused connection.
    A socket file left by a killed server is removed; a live server's socket or a file that
    is not a socket is never touched.
    """
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(info.st_mode):
            raise RuntimeError(f"{path} exists and is not a socket; refusing to replace it")
        if _answers(path):
            raise RuntimeError(f"another server is already listening on {path}")
        os.unlink(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, mode=0o755, exist_ok=True)
    staged = os.path.join(parent, f".{os.path.basename(path)}.{os.getpid()}.new")
    if len(os.fsencode(staged)) > MAX_PATH:
        raise ValueError(f"socket path {path!r} is too long to be staged")
    remove(staged)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(staged)
        os.chmod(staged, 0o600)
        sock.listen(backlog)
        try:
            os.link(staged, path)  # never replaces a server that started meanwhile
        except FileExistsError:
            raise RuntimeError(f"another server took {path} while this one started") from None
    except BaseException:
        sock.close()
        raise
    finally:
        remove(staged)
    return sock


def remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
