"""A real SeaweedFS cluster on this machine (`fusecsi dev --engine seaweedfs`, tests):
`weed master`, `weed volume` and `weed filer` as three processes on free loopback ports with
their data in a directory.

    with SeaweedBackend(tmp_path) as backend:
        backend.parameters   # StorageClass parameters: engine, filer-addrs, master-addrs
        backend.secrets      # CSI secret (the filer's JWT key when started with jwt_key)
        backend.stop_filer() / backend.start_filer()   # the filer down and back

Sync on purpose (subprocess + urllib), so any test, trio or not, and `fusecsi dev` can use
it. `LocalBackend(root, workers)` is the form `fusecsi.engines.local_cluster` starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from fusecsi.engines.seaweedfs.node import weed_binary

STARTUP_TIMEOUT = 60.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class SeaweedBackend:
    def __init__(
        self, base_dir: Path, *, jwt_key: str | None = None, jwt_read_key: str | None = None
    ) -> None:
        self.base = Path(base_dir) / "seaweedfs"
        self.jwt_key = jwt_key  # the filer's signing keys for HTTP writes and reads
        self.jwt_read_key = jwt_read_key
        self.weed = weed_binary()
        self.master = (_free_port(), _free_port())  # (http, grpc)
        self.volume = (_free_port(), _free_port())
        self.filer = (_free_port(), _free_port())
        self.procs: dict[str, subprocess.Popen] = {}

    # -- what tests use ------------------------------------------------------------------

    @property
    def filer_addr(self) -> str:
        return f"127.0.0.1:{self.filer[0]}.{self.filer[1]}"

    @property
    def master_addr(self) -> str:
        return f"127.0.0.1:{self.master[0]}.{self.master[1]}"

    @property
    def filer_url(self) -> str:
        return f"http://127.0.0.1:{self.filer[0]}"

    @property
    def parameters(self) -> dict[str, str]:
        return {
            "engine": "seaweedfs",
            "filer-addrs": self.filer_addr,
            "master-addrs": self.master_addr,
        }

    @property
    def secrets(self) -> dict[str, str]:
        secrets = {
            "jwt-filer-signing-key": self.jwt_key,
            "jwt-filer-signing-read-key": self.jwt_read_key,
        }
        return {name: value for name, value in secrets.items() if value}

    def log(self, name: str) -> str:
        return (self.base / f"{name}.log").read_text(errors="replace")

    def stop_filer(self) -> None:
        self._stop("filer")

    def start_filer(self) -> None:
        self._start_filer()
        self._wait_filer()

    # -- lifecycle -----------------------------------------------------------------------

    def __enter__(self) -> SeaweedBackend:
        self.base.mkdir(parents=True, exist_ok=True)
        try:
            mp, mg = self.master
            self._spawn(
                "master",
                ["master", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-port={mp}",
                 f"-port.grpc={mg}", f"-mdir={self._dir('master')}", "-volumeSizeLimitMB=64",
                 "-telemetry=false"],
            )  # fmt: skip
            self._wait(f"http://127.0.0.1:{mp}/cluster/status", "master")
            vp, vg = self.volume
            self._spawn(
                "volume",
                ["volume", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-port={vp}",
                 f"-port.grpc={vg}", f"-dir={self._dir('volume')}", "-max=0",
                 f"-mserver={self.master_addr}", "-preStopSeconds=0"],
            )  # fmt: skip
            self._wait_volume_registered()
            self._start_filer()
            self._wait_filer()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for name in reversed(list(self.procs)):
            self._stop(name, graceful=False)  # the data is thrown away: no need to wait
        for port in (*self.master, *self.volume, *self.filer):
            for kind in ("master", "volume", "filer"):
                for form in (f"{kind}-{port}", f"{kind}-grpc-{port}"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(f"/tmp/seaweedfs-{form}.sock")

    def _dir(self, name: str) -> Path:
        path = self.base / name
        path.mkdir(exist_ok=True)
        return path

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        log = open(self.base / f"{name}.log", "ab")  # noqa: SIM115
        self.procs[name] = subprocess.Popen(
            [self.weed, "-logtostderr=true", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        log.close()

    def _stop(self, name: str, *, graceful: bool = True) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM if graceful else signal.SIGKILL)
        try:
            proc.wait(timeout=3)  # a clean stop is quick; tests need no more than that
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)

    def _start_filer(self) -> None:
        fp, fg = self.filer
        env = {}
        if self.jwt_key:
            env["WEED_JWT_FILER_SIGNING_KEY"] = self.jwt_key
        if self.jwt_read_key:
            env["WEED_JWT_FILER_SIGNING_READ_KEY"] = self.jwt_read_key
        self._spawn(
            "filer",
            ["filer", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-port={fp}", f"-port.grpc={fg}",
             f"-master={self.master_addr}", f"-defaultStoreDir={self._dir('filer')}"],
            env,
        )  # fmt: skip

    def _wait(self, url: str, name: str, ready=lambda status, body: status == 200) -> bytes:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            proc = self.procs[name]
            if proc.poll() is not None:
                raise RuntimeError(
                    f"weed {name} exited {proc.returncode}: {self.log(name)[-2000:]}"
                )
            try:
                status, body = _get(url)
                if ready(status, body):
                    return body
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"weed {name} not ready in {STARTUP_TIMEOUT}s: {self.log(name)[-2000:]}"
                )
            time.sleep(0.1)

    def _wait_volume_registered(self) -> None:
        def registered(status: int, body: bytes) -> bool:
            if status != 200:
                return False
            topology = json.loads(body).get("Topology") or {}
            return any(
                rack.get("DataNodes")
                for dc in topology.get("DataCenters") or []
                for rack in dc.get("Racks") or []
            )

        self._wait(f"http://127.0.0.1:{self.master[0]}/dir/status", "volume", registered)

    def _wait_filer(self) -> None:
        self._wait(f"{self.filer_url}/healthz", "filer")
        # ready for data, not only for metadata: one small file through the whole path
        from fusecsi.engines.seaweedfs.http import jwt_hs256

        headers = {"Authorization": "Bearer " + jwt_hs256(self.jwt_key)} if self.jwt_key else {}
        deadline = time.monotonic() + STARTUP_TIMEOUT
        url = f"{self.filer_url}/.fusecsi-test-ready"
        while True:
            try:
                put = urllib.request.Request(url, data=b"ok", method="PUT", headers=headers)
                with urllib.request.urlopen(put, timeout=10):
                    pass
                # (a DELETE is a write: the write key signs it too)
                delete = urllib.request.Request(url, method="DELETE", headers=headers)
                with urllib.request.urlopen(delete, timeout=10):
                    return
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"filer cannot store data: {exc}") from None
                time.sleep(0.2)


class LocalBackend(SeaweedBackend):
    """The registry's form (`fusecsi.engines.local_cluster`): one volume server whatever
    `workers` says (SeaweedFS replicates by volume servers; one is enough on one machine)."""

    def __init__(self, root: Path, workers: int = 1) -> None:
        super().__init__(root)

    def describe(self) -> str:
        return f"weed master, volume server and filer; filer at {self.filer_url}"


def main() -> None:
    """`python -m fusecsi.engines.seaweedfs.local DIR`: run a cluster until interrupted (for poking at)."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop the servers on TERM too
    with SeaweedBackend(Path(sys.argv[1])) as backend:
        print(json.dumps(backend.parameters), flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()


if __name__ == "__main__":
    main()
