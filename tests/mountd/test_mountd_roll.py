"""Rolling daemons to new code through mountd (fusecsi/mountd/rolling.py): a real mountd,
real daemons, real FUSE. Under a held-open reader, a cwd, an mmap, an fsync'd appender and a
writer that never fsyncs (support/takeover_load.py), each key's daemon hands its mount over
to a new one: no error, every acknowledged write read back, the targets' mounts unchanged,
no recovery counted. A restarted mountd rolls the daemons it adopted from another build (the
build the table records for them) by itself; an engine's own `hand_over` is used (and its
refusal leaves the daemon serving); an engine that cannot hand over is skipped; a successor
that cannot start ends in a recovery."""

from __future__ import annotations

import errno
import json
import os
import signal

import pytest
import trio
from support.fake_engine import fake_cluster, fake_target, supervisor_on_fake
from support.mountd import (  # noqa: F401 - fixtures
    TOKEN,
    Mountd,
    check_load,
    check_nothing_leaked,
    cluster_fixture,
    eventually,
    make_dirs,
    mount_ids,
    mountd_fixture,
    open_fds,
    publish_volume,
    read_write,
    supervisor_in_process,
    under_load,
)

from fusecsi.engines.embedded import NODE as EMBEDDED
from fusecsi.mountd import mounts
from fusecsi.mountd.client import RPCError

# FUSECSI_ROLLS=10 for the long run
ROLLS = int(os.environ.get("FUSECSI_ROLLS", "2"))


def table_of(mountd: Mountd) -> dict:
    return json.loads((mountd.state_dir / "table.json").read_text())


def record_build(mountd: Mountd, build: str) -> None:
    """What a daemon of another build looks like to the next mountd: its table says so."""
    table = table_of(mountd)
    for entry in table["entries"]:
        entry["build"] = build
    (mountd.state_dir / "table.json").write_text(json.dumps(table))


def logged(mountd: Mountd, message: str) -> list[dict]:
    """The records of the running mountd's log with this message."""
    records = (json.loads(line) for line in mountd.log().splitlines() if line.startswith("{"))
    return [r for r in records if r.get("msg") == message]


async def test_roll_hands_each_daemon_over_with_no_error(mountd, cluster, tmp_path):
    target = await publish_volume(mountd, cluster, "roll")
    layers = mount_ids(target)
    [before] = await mountd.client.list()
    descriptors = open_fds(mountd.proc.pid)
    pid = before["pid"]
    async with under_load(target, tmp_path / "report.json") as report:
        for _ in range(ROLLS):
            await trio.sleep(0.5)
            [done] = await mountd.client.roll()
            assert done["result"] == "rolled", done
            assert done["key"] == before["key"] and done["old_pid"] == pid != done["new_pid"]
            pid = done["new_pid"]
        await trio.sleep(0.5)
    print(f"{ROLLS} rolls")
    check_load(report)
    assert mount_ids(target) == layers  # the same mount served throughout: nothing re-bound
    [after] = await mountd.client.list()
    assert after["pid"] == pid and after["state"] == "running"
    assert after["restarts"] == before["restarts"] and after["build"] == before["build"]
    assert logged(mountd, "recovering") == [] and "MountRecovered" not in mountd.log()
    assert mountd.daemon_pids() == [pid]
    check_nothing_leaked(mountd, descriptors)
    with pytest.raises(RPCError) as info:
        await mountd.client.roll(key="0123456789abcdef")
    assert info.value.errno == errno.ENOENT
    await mountd.client.unpublish("vol-roll", target)
    assert mountd.daemon_pids() == [] and mountd.fuse_mounts() == ([], [])


async def test_a_restarted_mountd_rolls_the_daemons_of_another_build(mountd, cluster, tmp_path):
    target = await publish_volume(mountd, cluster, "build")
    layers = mount_ids(target)
    [before] = await mountd.client.list()
    assert before["build"] and table_of(mountd)["entries"][0]["build"] == before["build"]
    # the same build: adopted and left alone
    mountd.kill(signal.SIGTERM)
    mountd.start()
    [checked] = await eventually(
        lambda: logged(mountd, "adopted daemons checked"), deadline=30, what="the check"
    )
    [same] = await mountd.client.list()
    assert same["pid"] == before["pid"] and checked["current"] == 1 and checked["rolled"] == 0
    async with under_load(target, tmp_path / "report.json") as report:
        await trio.sleep(0.5)
        # another build (as the table records it): the next mountd hands the daemon over
        mountd.kill(signal.SIGTERM)
        record_build(mountd, "0.0.1+another")
        await trio.sleep(0.5)  # the load goes on without mountd
        mountd.start()

        async def rolled():
            [now] = await mountd.client.list()
            return now["pid"] != before["pid"] and now["state"] == "running" and now

        after = await eventually(rolled, deadline=60, what="roll after adoption")
        [checked] = await eventually(
            lambda: logged(mountd, "adopted daemons checked"), deadline=30, what="the check"
        )
        await trio.sleep(0.5)
    check_load(report)
    assert mount_ids(target) == layers
    assert after["build"] == before["build"] == table_of(mountd)["entries"][0]["build"]
    assert after["restarts"] == before["restarts"]
    assert checked["rolled"] == 1 and checked["current"] == 0
    assert logged(mountd, "recovering") == [] and "MountRecovered" not in mountd.log()
    assert mountd.daemon_pids() == [after["pid"]]
    await mountd.client.unpublish("vol-build", target)
    assert mountd.daemon_pids() == [] and mountd.fuse_mounts() == ([], [])


async def test_a_successor_that_cannot_start_falls_back_to_recovery(mountd, cluster):
    """The connection's recorded INIT is gone: no daemon can take the mount over, so the
    roll ends in a recovery (a fresh mount, re-bound) rather than a key without a daemon."""
    target = await publish_volume(mountd, cluster, "fail")
    layers = mount_ids(target)
    [before] = await mountd.client.list()
    os.unlink(mountd.state_dir / "connections" / before["key"] / "init")
    [done] = await mountd.client.roll()
    assert done["result"] == "failed", done
    assert "recovery mounted it afresh and re-bound its targets" in done["message"], done
    [after] = await mountd.client.list()
    assert after["state"] == "running" and after["restarts"] == before["restarts"] + 1
    assert after["pid"] == done["new_pid"] != before["pid"]
    assert read_write(target, "after", "served again")
    assert len(mount_ids(target)) == len(layers) + 1  # the fresh mount bound on top
    await mountd.client.unpublish("vol-fail", target)
    assert mountd.daemon_pids() == [] and mountd.fuse_mounts() == ([], [])


async def test_a_roll_and_publishes_of_its_key_at_once(mountd, cluster):
    """Publish and unpublish of the rolled key wait for the key lock: each one lands on the
    old daemon's mount or the new one's, never in between."""
    await make_dirs(cluster, "/busy/v", "/busy/w")
    first, second = mountd.target("pod-1", "v"), mountd.target("pod-2", "w")
    await mountd.publish("vol-1", "/busy", "v", first)
    layers = mount_ids(first)
    answers = {}
    async with trio.open_nursery() as nursery:

        async def roll():
            answers["roll"] = await mountd.client.roll()

        async def publish_and_unpublish():
            answers["publish"] = await mountd.publish("vol-2", "/busy", "w", second)
            assert read_write(second, "x", "on the rolled key")
            answers["unpublish"] = await mountd.client.unpublish("vol-2", second)

        nursery.start_soon(roll)
        nursery.start_soon(publish_and_unpublish)
    [done] = answers["roll"]
    assert done["result"] == "rolled", done
    assert answers["publish"]["key"] == done["key"] and answers["unpublish"]["removed"]
    [row] = await mountd.client.list()
    assert row["pid"] == done["new_pid"] and row["restarts"] == 0
    assert [r["target"] for r in row["refs"]] == [first] and mount_ids(first) == layers
    assert read_write(first, "y", "still served")
    await mountd.client.unpublish("vol-1", first)
    assert mountd.daemon_pids() == [] and mountd.fuse_mounts() == ([], [])


async def test_no_roll_adopted_keeps_the_adopted_daemon(cluster, tmp_path):
    node = Mountd(tmp_path, cluster, **{"no-roll-adopted": True})
    try:
        node.start()
        target = await publish_volume(node, cluster, "keep")
        [before] = await node.client.list()
        node.kill(signal.SIGTERM)
        record_build(node, "0.0.1+another")
        node.start()
        await trio.sleep(2)  # the time a roll in the background would have had
        [adopted] = await node.client.list()
        assert adopted["pid"] == before["pid"] and logged(node, "rolling an adopted daemon") == []
        # a roll asked for (the command) still hands it over
        ran = await trio.to_thread.run_sync(node.roll, "--json")
        assert ran.returncode == 0, ran.stderr
        [done] = json.loads(ran.stdout)
        assert done["result"] == "rolled" and done["old_pid"] == before["pid"], done
        assert done["old_build"] == "0.0.1+another" and done["build"] == before["build"]
        ran = await trio.to_thread.run_sync(node.roll, "--key", before["key"])
        assert (
            ran.returncode == 0 and f"{before['key']}  rolled  {done['new_pid']} -> " in ran.stdout
        )
        ran = await trio.to_thread.run_sync(node.roll, "--key", "0123456789abcdef")
        assert ran.returncode == 1 and "no key '0123456789abcdef'" in ran.stderr
        await node.client.unpublish("vol-keep", target)
    finally:
        node.close()


async def test_an_engine_that_cannot_hand_over_is_skipped(tmp_path):
    with fake_cluster(tmp_path) as cluster:
        async with supervisor_on_fake(tmp_path) as sup:
            answer = await sup.publish(
                volume_id="vol-1",
                engine="fake",
                cluster=str(cluster),
                fs_path="/base",
                subpath="v1",
                target=fake_target(sup),
                readonly=False,
                secrets={"token": "fake-token-51c2"},
            )
            [entry] = sup.table.entries.values()
            pid = entry.pid
            [done] = await sup.roll()
            assert done["key"] == answer["key"] and done["result"] == "skipped", done
            assert "engine fake cannot hand over" in done["message"]
            assert entry.pid == pid and sup.key_states[answer["key"]].state == "running"
            assert sup.rolls.counts == {("skipped",): 1}


class HandsOver:
    """The embedded engine with a `hand_over` of its own, as an engine that hands over by
    its own protocol has: it refuses once, then asks the daemon to leave (SIGTERM)."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.refuse = True

    def __getattr__(self, name):
        return getattr(EMBEDDED, name)

    async def hand_over(self, pid: int, connection_dir: str, grace: float) -> None:
        self.calls.append((pid, connection_dir, grace))
        if self.refuse:
            self.refuse = False
            raise OSError(errno.EBUSY, "a handover is under way")
        os.kill(pid, signal.SIGTERM)


async def test_an_engine_s_own_handover_is_used_and_a_refusal_keeps_the_daemon(tmp_path, cluster):
    await make_dirs(cluster, "/own/v")
    engine = HandsOver()
    async with supervisor_in_process(tmp_path, takeover=True, engines=lambda _: engine) as sup:
        target = os.path.join(sup.kubelet_dir, "pods/p/volumes/kubernetes.io~csi/v/mount")
        os.makedirs(os.path.dirname(target))
        key = (
            await sup.publish(
                volume_id="vol-own",
                cluster=cluster.master_addrs,
                fs_path="/own",
                subpath="v",
                target=target,
                readonly=False,
                secrets={"token": TOKEN},
            )
        )["key"]
        entry = sup.table.entries[key]
        pid = entry.pid
        [refused] = await sup.roll(grace=30)
        assert refused["result"] == "failed", refused
        assert refused["message"] == (
            "the daemon refused to hand over: a handover is under way; it keeps serving"
        )
        assert entry.pid == pid and sup.key_states[key].state == "running"
        assert await trio.to_thread.run_sync(read_write, target, "a", "the old daemon")
        [done] = await sup.roll(grace=30)
        assert done["result"] == "rolled" and done["new_pid"] == entry.pid != pid, done
        assert engine.calls == [(pid, os.path.join(sup.connections_dir, key), 30.0)] * 2
        assert await trio.to_thread.run_sync(read_write, target, "b", "the new daemon")
        assert entry.restarts == 0
        assert sup.rolls.counts == {("failed",): 1, ("rolled",): 1}
        await sup.unpublish("vol-own", target)  # closes mountd's duplicate of the connection
        assert sup.table.entries == {} and mounts.mounts_under(str(tmp_path)) == []
