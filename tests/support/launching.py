"""Start an engine's `Launch` with mountd's own pieces (its private files, placeholders and
minimal environment), for engine tests that drive a daemon without mountd around it."""

from __future__ import annotations

import subprocess
from pathlib import Path

from fusecsi.engines.base import Launch
from fusecsi.mountd.daemons import daemon_env, fill, write_private_files


def start(launch: Launch, private: Path, log: Path) -> subprocess.Popen:
    """The daemon in its own session, its output appended to `log`."""
    write_private_files(str(private), launch.files)
    values = {"private": str(private)}
    argv = [fill(arg, values) for arg in launch.argv]
    env = daemon_env({k: fill(v, values) for k, v in launch.env.items()})
    with open(log, "ab") as out:
        return subprocess.Popen(
            argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
