"""A real JuiceFS filesystem on this machine (`fusecsi dev --engine juicefs`, tests): metadata
in redis-server (or a SQLite file), data in a local directory, formatted with the real
`juicefs` binary.

    with redis_backend(tmp_path) as backend:
        backend.parameters   # StorageClass parameters ({"engine": "juicefs"})
        backend.secrets      # the CSI secret ({"metaurl": "redis://:<password>@…"})
        backend.cluster      # the parsed Cluster (address without the password)
        backend.stop_metadata() / backend.start_metadata()   # an outage, then recovery

`LocalBackend(root, workers)` is the form `fusecsi.engines.local_cluster` starts: Redis
when redis-server is installed, else SQLite.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from fusecsi.engines.base import Cluster
from fusecsi.engines.juicefs import NODE
from fusecsi.engines.juicefs.metaurl import binary

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def juicefs(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> str:
    """Run the real `juicefs`; its stdout (a failure raises with its stderr)."""
    result = subprocess.run(
        [binary(), *args],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **(env or {})},
        capture_output=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise RuntimeError(f"juicefs {args[0]} failed: {result.stderr.decode()[-2000:]}")
    return result.stdout.decode()


@dataclass
class Backend:
    metaurl: str
    name: str
    workdir: Path
    redis: subprocess.Popen | None = None
    redis_argv: list[str] = field(default_factory=list)
    password: str = ""
    capacity_gib: int = 1  # the volume's size limit (`juicefs format --capacity`)

    @property
    def parameters(self) -> dict[str, str]:
        return {"engine": "juicefs"}

    @property
    def secrets(self) -> dict[str, str]:
        return {"metaurl": self.metaurl}

    @property
    def cluster(self) -> Cluster:
        return NODE.parse_cluster(self.parameters, self.secrets)

    def stop_metadata(self) -> None:
        """Stop the metadata server (SIGKILL: an outage, not a shutdown)."""
        if self.redis is None:
            raise RuntimeError("the SQLite backend has no metadata server to stop")
        self.redis.kill()
        self.redis.wait(timeout=10)

    def start_metadata(self) -> None:
        if self.redis is None or self.redis.poll() is None:
            return
        self.redis = _start_redis(self.redis_argv, self.workdir)


def _start_redis(argv: list[str], workdir: Path) -> subprocess.Popen:
    log = open(workdir / "redis.log", "ab")  # noqa: SIM115 (the process holds it)
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    port = int(argv[argv.index("--port") + 1])
    deadline = time.monotonic() + 15
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return proc
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"redis-server did not start: {(workdir / 'redis.log').read_text()}")
        time.sleep(0.05)


def _format(backend: Backend, env: dict[str, str]) -> None:
    bucket = backend.workdir / "bucket"
    public = NODE.parse_cluster({}, {"metaurl": backend.metaurl}).address
    juicefs(
        "format",
        "--storage=file",
        f"--bucket={bucket}/",
        "--trash-days=0",  # deletes free space at once (tests check capacity)
        f"--capacity={backend.capacity_gib}",
        public,
        backend.name,
        env=env,
    )


@contextlib.contextmanager
def redis_backend(tmp_path: Path) -> Iterator[Backend]:
    """redis-server on a free loopback port, password protected, with a formatted volume."""
    workdir = tmp_path / "juicefs-redis"
    workdir.mkdir()
    password = secrets.token_hex(12)
    port = free_port()
    argv = [
        REDIS_SERVER,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(workdir),
        "--save",
        "",
        "--appendonly",
        "yes",  # survives its own restart (the outage test starts it again)
        "--requirepass",
        password,
    ]
    backend = Backend(
        metaurl=f"redis://:{password}@127.0.0.1:{port}/1",
        name="fusecsi-test",
        workdir=workdir,
        redis=_start_redis(argv, workdir),
        redis_argv=argv,
        password=password,
    )
    try:
        _format(backend, {"META_PASSWORD": password})
        yield backend
    finally:
        if backend.redis is not None and backend.redis.poll() is None:
            backend.redis.kill()
            backend.redis.wait(timeout=10)


@contextlib.contextmanager
def sqlite_backend(tmp_path: Path) -> Iterator[Backend]:
    """A SQLite metadata file (one machine only) with a formatted volume."""
    workdir = tmp_path / "juicefs-sqlite"
    workdir.mkdir()
    backend = Backend(
        metaurl=f"sqlite3://{workdir}/meta.db", name="fusecsi-test-sqlite", workdir=workdir
    )
    _format(backend, {})
    yield backend


class LocalBackend:
    """The registry's form (`fusecsi.engines.local_cluster`); `workers` does not apply (the
    data goes to a local-directory bucket)."""

    def __init__(self, root: Path, workers: int = 1) -> None:
        self.root = Path(root)
        self._stack = contextlib.ExitStack()
        self.backend: Backend | None = None

    def __enter__(self) -> LocalBackend:
        self.root.mkdir(parents=True, exist_ok=True)
        start = redis_backend if os.path.exists(REDIS_SERVER) else sqlite_backend
        self.backend = self._stack.enter_context(start(self.root))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    @property
    def parameters(self) -> dict[str, str]:
        return self.backend.parameters

    @property
    def secrets(self) -> dict[str, str]:
        return self.backend.secrets

    def describe(self) -> str:
        meta = "redis-server" if self.backend.redis is not None else "SQLite"
        return f"juicefs volume {self.backend.name}: metadata in {meta}, data in a local bucket"
