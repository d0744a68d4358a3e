"""A local "Curvine cluster" for tests only, made of the stand-ins (no Curvine binary can be
obtained here): a stand-in master process keeping its namespace in a real directory
(curvine_standin.DirTree) and a `curvine-fuse` wrapper that runs the stand-in curvine-fuse
passing the same directory through. With `.parameters`, `.secrets` and `.describe()` like
the engines' `local.LocalBackend`, so `DevStack(..., backend=...)` plays the walkthrough
on it. Point mountd at `.binary` with $FUSECSI_CURVINE_FUSE, as a node would be.
"""

from __future__ import annotations

import os
import selectors
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
START_TIMEOUT = 15.0


class StandinCurvine:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.namespace_dir = root / "namespace"
        self.binary = root / "curvine-fuse"
        self.address = ""
        self._master: subprocess.Popen | None = None

    @property
    def parameters(self) -> dict[str, str]:
        return {"engine": "curvine", "master-addrs": self.address}

    @property
    def secrets(self) -> dict[str, str]:
        return {}  # Curvine has no authentication

    def describe(self) -> str:
        return (
            f"stand-in master on {self.address} (namespace in {self.namespace_dir}), "
            f"stand-in curvine-fuse {self.binary}"
        )

    def __enter__(self) -> StandinCurvine:
        self.namespace_dir.mkdir(parents=True)
        python_path = f"{REPO}:{HERE}"
        # mountd gives its daemons a minimal environment: the wrapper carries what they need
        self.binary.write_text(
            "#!/bin/sh\n"
            f"export PYTHONPATH='{python_path}' CURVINE_STANDIN_ROOT='{self.namespace_dir}'\n"
            f"exec '{sys.executable}' '{HERE / 'curvine_fuse_standin.py'}' \"$@\"\n"
        )
        self.binary.chmod(0o755)
        log = open(self.root / "master.log", "ab")  # noqa: SIM115 - owned by the child
        self._master = subprocess.Popen(
            [sys.executable, str(HERE / "curvine_standin.py"), str(self.namespace_dir)],
            stdout=subprocess.PIPE,
            stderr=log,
            env={**os.environ, "PYTHONPATH": python_path},
        )
        log.close()
        try:
            self.address = self._read_address()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _read_address(self) -> str:
        assert self._master is not None and self._master.stdout is not None
        os.set_blocking(self._master.stdout.fileno(), True)
        with selectors.DefaultSelector() as selector:
            selector.register(self._master.stdout, selectors.EVENT_READ)
            if not selector.select(START_TIMEOUT):
                raise RuntimeError(f"the stand-in master did not start; see {self.root}")
        line = self._master.stdout.readline().decode().strip()
        if not line:
            raise RuntimeError(f"the stand-in master exited; see {self.root / 'master.log'}")
        return line

    def __exit__(self, *exc) -> None:
        if self._master is not None:
            self._master.terminate()
            try:
                self._master.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._master.kill()
                self._master.wait()
            self._master.stdout.close()
            self._master = None
