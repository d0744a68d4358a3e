"""Issue 22: a running container gets its volume back after the FUSE daemon dies.

The "container" is a process in its own mount namespace holding a slave copy of the target
at another path, as runc sets up `mountPropagation: HostToContainer`; the kubelet dir is a
shared mount, as kubelet makes it. Only a new mount stacked on the target reaches it — or,
with takeover (the default), the same mount served by the replacement daemon.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import trio
from support.mountd import (  # noqa: F401 - fixtures
    another_mountd,
    cluster_fixture,
    make_dirs,
    read_text,
    read_write,
)

from fusecsi.dev.stack import Container, share_like_kubelet
from fusecsi.mountd import mounts

RECOVERY_DEADLINE = 30.0  # the old code never recovers a container: fail, do not hang


@pytest.mark.parametrize("takeover", [True, False], ids=["takeover", "rebind"])
async def test_a_hosttocontainer_container_reads_and_writes_again_after_a_daemon_crash(
    tmp_path, cluster, takeover
):
    base = tmp_path / "node"
    share_like_kubelet(base / "kubelet")
    await make_dirs(cluster, "/ctr/v")
    flags = {} if takeover else {"no-takeover": True}
    with another_mountd(base, cluster, **flags) as node:
        target = node.target("pod-1", "v")
        await node.publish("vol-ctr", "/ctr", "v", target)
        assert read_write(target, "before", "written before the crash")
        container = Container(Path(target), tmp_path / "container" / "data", "probe")
        async with trio.open_nursery() as nursery:
            await nursery.start(container.run)
            [row] = await node.client.list()
            killed = time.monotonic()
            os.kill(row["pid"], signal.SIGKILL)
            with trio.fail_after(RECOVERY_DEADLINE):
                took = await container.outage(killed)
            print(f"the container read and wrote again {took:.2f}s after its first failure")
            nursery.cancel_scope.cancel()
        # takeover: the same mount, served again; else the new one sits on the dead one
        assert len(mounts.stack_at(target)) == (1 if takeover else 2)
        assert read_text(os.path.join(target, "before")) == "written before the crash"
        assert await node.client.unpublish("vol-ctr", target) == {"removed": True}
        assert mounts.stack_at(target) == [] and node.fuse_mounts() == ([], [])
