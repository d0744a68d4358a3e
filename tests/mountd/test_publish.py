"""Publishing through a real mountd: sharing daemons per key, references per target, refusals."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import urllib.request

import pytest
import trio
from support.mountd import (  # noqa: F401 - fixtures
    TOKEN,
    another_mountd,
    cluster_fixture,
    errno_of,
    eventually,
    exists,
    make_dirs,
    mountd_fixture,
    read_bytes,
    read_text,
    read_write,
)
from support.processes import FUSECSI

from fusecsi.cluster.client import ClusterClient
from fusecsi.cluster.local import free_port
from fusecsi.mountd import mounts
from fusecsi.mountd.client import RPCError


async def test_thirty_volumes_over_three_keys_share_three_daemons(mountd, cluster):
    keys = [("/share-a", ""), ("/share-b", ""), ("/share-a", "attr-timeout=2")]
    await make_dirs(cluster, *(f"{fs}/pv{i}" for fs in ("/share-a", "/share-b") for i in range(30)))
    volumes = [
        (f"vol{i}", *keys[i % 3], f"pv{i}", mountd.target(f"pod{i}", f"pv{i}")) for i in range(30)
    ]
    answers = {}

    async def publish(vid, fs_path, options, subpath, target):
        answers[vid] = await mountd.publish(vid, fs_path, subpath, target, options=options)

    async with trio.open_nursery() as nursery:
        for volume in volumes:
            nursery.start_soon(publish, *volume)

    rows = await mountd.client.list()
    assert len(rows) == 3
    assert sorted(len(r["refs"]) for r in rows) == [10, 10, 10]
    assert len({a["key"] for a in answers.values()}) == 3
    assert sum(a["daemon_started"] for a in answers.values()) == 3
    assert sorted(r["pid"] for r in rows) == mountd.daemon_pids()
    daemon_mounts, targets = mountd.fuse_mounts()
    assert daemon_mounts == sorted(r["mountpoint"] for r in rows)
    assert targets == sorted(v[4] for v in volumes)

    # the token reaches each daemon through a 0600 file in its key's private directory,
    # never its arguments, environment or the table
    for pid in mountd.daemon_pids():
        args = read_bytes(f"/proc/{pid}/cmdline").split(b"\0")
        assert TOKEN.encode() not in b"\0".join(args)
        assert b"--metrics-file" not in args  # nobody exports
        assert TOKEN.encode() not in read_bytes(f"/proc/{pid}/environ")
        token_file = os.fsdecode(args[args.index(b"--token-file") + 1])
        assert os.path.dirname(os.path.dirname(token_file)) == str(mountd.state_dir / "private")
        assert os.stat(token_file).st_mode & 0o777 == 0o600  # noqa: ASYNC240 - a quick stat
        assert os.stat(os.path.dirname(token_file)).st_mode & 0o777 == 0o700  # noqa: ASYNC240
        assert read_bytes(token_file) == TOKEN.encode()
    assert TOKEN.encode() not in read_bytes(mountd.state_dir / "table.json")
    token_files = sorted((mountd.state_dir / "tokens").iterdir())  # kept for restarts
    assert [f.name for f in token_files] == sorted(r["key"] for r in rows)
    for token_file in token_files:
        assert token_file.stat().st_mode & 0o777 == 0o600
        assert json.loads(read_bytes(token_file)) == {"secrets": {"token": TOKEN}}

    # each target is its own cluster directory: a file written through it lands there
    for vid, *_, target in volumes[:6]:
        assert read_write(target, "owner", vid)
    async with ClusterClient(cluster.master_addrs, token=TOKEN) as client:
        for vid, fs_path, _, subpath, _ in volumes[:6]:
            attr = await client.resolve(f"{fs_path}/{subpath}/owner")
            assert await client.read(attr.ino, 0, 100) == vid.encode()

    async with trio.open_nursery() as nursery:
        for vid, *_, target in volumes:
            nursery.start_soon(mountd.client.unpublish, vid, target)
    assert await mountd.client.list() == []
    assert mountd.daemon_pids() == []
    assert mountd.fuse_mounts() == ([], [])
    assert not any(exists(v[4]) for v in volumes)  # the plugin removes what it made


async def test_two_targets_of_one_volume_hold_their_own_references(mountd, cluster):
    await make_dirs(cluster, "/rwx/shared")
    t1, t2, t3 = (mountd.target(pod, "pv-rwx") for pod in ("pod-1", "pod-2", "pod-3"))
    first = await mountd.publish("vol-rwx", "/rwx", "shared", t1)
    second = await mountd.publish("vol-rwx", "/rwx", "shared", t2)
    assert first["daemon_started"] and not second["daemon_started"]
    assert first["key"] == second["key"]
    assert read_write(t1, "note", "from pod 1")
    assert read_text(os.path.join(t2, "note")) == "from pod 1"

    # idempotent: the same volume, target and options again
    again = await mountd.publish("vol-rwx", "/rwx", "shared", t1)
    assert again == {**first, "daemon_started": False}
    # the same target with another volume, read-only flag or options is refused
    for change in ({"readonly": True}, {"options": "attr-timeout=5"}):
        with pytest.raises(RPCError) as info:
            await mountd.publish("vol-rwx", "/rwx", "shared", t1, **change)
        assert errno_of(info.value) == "EEXIST"
    with pytest.raises(RPCError) as info:
        await mountd.publish("vol-other", "/rwx", "shared", t1)
    assert errno_of(info.value) == "EEXIST"

    # read-only publish of the same volume on a third target
    await mountd.publish("vol-rwx", "/rwx", "shared", t3, readonly=True)
    options = set(mounts.top_mount(t3).options.split(","))
    assert {"ro", "nosuid", "nodev"} <= options  # read-only must not drop the safety flags
    with pytest.raises(OSError) as info:
        read_write(t3, "denied", "x")
    assert info.value.errno == errno.EROFS

    pid = (await mountd.client.list())[0]["pid"]
    assert await mountd.client.unpublish("vol-rwx", t1) == {"removed": True}
    assert await mountd.client.unpublish("vol-rwx", t1) == {"removed": False}
    assert read_write(t2, "after", "t1 is gone")
    rows = await mountd.client.list()
    assert rows[0]["pid"] == pid and [r["target"] for r in rows[0]["refs"]] == [t2, t3]
    assert mountd.fuse_mounts()[1] == [t2, t3]
    for target in (t2, t3):
        await mountd.client.unpublish("vol-rwx", target)
    assert mountd.daemon_pids() == [] and mountd.fuse_mounts() == ([], [])


async def test_stats_reads_the_volume_quota_through_the_mount(mountd, cluster):
    await make_dirs(cluster, "/quota/pvq")
    async with ClusterClient(cluster.master_addrs, token=TOKEN) as client:
        attr = await client.resolve("/quota/pvq")
        await client.set_quota(attr.ino, 10 << 20, 1000)
    target = mountd.target("pod-q", "pvq")
    await mountd.publish("vol-q", "/quota", "pvq", target)
    assert read_write(target, "data", "x" * 5000)
    stats = await mountd.client.stats(target)
    assert stats["volume_id"] == "vol-q" and stats["healthy"] is True
    assert stats["max_bytes"] == 10 << 20 and stats["max_inodes"] == 1000
    assert stats["used_bytes"] >= 5000 and stats["used_inodes"] >= 1
    with pytest.raises(RPCError) as info:
        await mountd.client.stats(mountd.target("pod-q", "unpublished"))
    assert errno_of(info.value) == "ENOENT"
    await mountd.client.unpublish("vol-q", target)


async def test_bad_input_is_refused_and_binds_nothing(mountd, cluster, tmp_path):
    await make_dirs(cluster, "/bad/pv", "/bad/inner/deeper")
    outside = tmp_path / "outside"
    outside.mkdir()
    escape = mountd.kubelet_dir / "pods" / "escape"
    escape.parent.mkdir(parents=True, exist_ok=True)
    escape.symlink_to(outside)
    good = mountd.target("pod-b", "pv")

    async def refused(code, **overrides):
        args = {"subpath": "pv", "target": good, "fs_path": "/bad", "options": ""}
        args.update(overrides)
        if args["target"].startswith(str(mountd.kubelet_dir)):
            mountd.make_parent(args["target"])
        with pytest.raises(RPCError) as info:
            await mountd.client.publish(
                volume_id="vol-bad",
                cluster=args.get("master_addrs", cluster.master_addrs),
                fs_path=args["fs_path"],
                subpath=args["subpath"],
                options=args["options"],
                target=args["target"],
                readonly=False,
                secrets={"token": TOKEN},
            )
        assert errno_of(info.value) == code, (overrides, info.value)

    await refused("EPERM", target=str(outside / "mount"))
    await refused("EPERM", target=str(escape / "mount"))
    await refused("EPERM", target=f"{mountd.kubelet_dir}/pods/../../outside/mount")
    await refused("EINVAL", target="relative/mount")
    for subpath in ("../pv", "inner/../../pv", "/pv", "", "a//b", "inner/./deeper"):
        await refused("EINVAL", subpath=subpath)
    await refused("EINVAL", master_addrs="not an address")
    await refused("EINVAL", options="no-such-option=1")
    await refused("EIO", fs_path="/no-such-base")
    await refused("ENOENT", subpath="missing")
    await refused("ENOENT", subpath="inner/missing")
    assert os.listdir(outside) == []
    assert mountd.fuse_mounts() == ([], [])
    assert not exists(good)
    assert await mountd.client.list() == []  # the daemon started for the ENOENT case is gone
    assert mountd.daemon_pids() == []

    # a daemon that cannot start says why, through mountd, without echoing the token
    with pytest.raises(RPCError) as info:
        await mountd.client.publish(
            volume_id="vol-bad",
            cluster=cluster.master_addrs,
            fs_path="/bad",
            subpath="pv",
            target=good,
            readonly=False,
            secrets={"token": "wrong-token"},
        )
    assert errno_of(info.value) == "EIO" and "wrong-token" not in str(info.value)
    assert "auth" in str(info.value).lower(), info.value
    assert mountd.fuse_mounts() == ([], []) and mountd.daemon_pids() == []

    with pytest.raises(RPCError) as info:
        await mountd.client.unpublish("vol-bad", "relative")
    assert errno_of(info.value) == "EINVAL"
    # named fields only: a missing or unknown field is named in one line
    missing = "publish: missing field(s) cluster, fs_path, readonly, subpath, target"
    unknown = "unpublish: unknown field(s) extra, token (mountd API version 2)"
    for method, fields, message in (
        ("publish", {"volume_id": "vol-bad"}, missing),
        ("unpublish", {"volume_id": "vol-bad", "target": good, "extra": 1, "token": "t"}, unknown),
    ):
        with pytest.raises(RPCError) as info:
            await mountd.client.call(method, **fields)
        assert errno_of(info.value) == "EINVAL" and info.value.strerror == message, method
        assert "\n" not in info.value.strerror and '"t"' not in info.value.strerror
    assert await mountd.client.unpublish("vol-bad", good) == {"removed": False}


async def test_linger_keeps_an_unused_daemon_for_the_next_pod(tmp_path, cluster):
    await make_dirs(cluster, "/linger/v")
    port = free_port()
    with another_mountd(
        tmp_path / "node", cluster, linger="3", **{"metrics-address": f"127.0.0.1:{port}"}
    ) as node:
        t1, t2 = node.target("pod-1", "v"), node.target("pod-2", "v")
        first = await node.publish("vol-l", "/linger", "v", t1)
        [pid] = node.daemon_pids()  # mountd exports the daemon's metrics file: it writes one
        assert b"--metrics-file" in read_bytes(f"/proc/{pid}/cmdline")
        metrics = await trio.to_thread.run_sync(scrape, port)
        assert f'fusecsi_mountd_references{{key="{first["key"]}"}} 1.0' in metrics
        assert "fusecsi_mountd_publishes_total 1.0" in metrics
        assert 'fusecsi_mountd_daemons{state="running"} 1.0' in metrics
        await node.client.unpublish("vol-l", t1)
        [row] = await node.client.list()
        assert row["refs"] == [] and row["state"] == "running"
        second = await node.publish("vol-l", "/linger", "v", t2)
        assert first["daemon_started"] and not second["daemon_started"]
        assert (await node.client.list())[0]["pid"] == row["pid"]
        await node.client.unpublish("vol-l", t2)

        async def forgotten() -> bool:
            return await node.client.list() == []

        await eventually(forgotten, deadline=15, what="linger stop")
        assert node.daemon_pids() == [] and node.fuse_mounts() == ([], [])


async def test_status_command_prints_keys_daemons_and_references(mountd, cluster):
    await make_dirs(cluster, "/status/v")
    target = mountd.target("pod-s", "v")
    answer = await mountd.publish("vol-status", "/status", "v", target, readonly=True)
    [row] = await mountd.client.list()
    table = await trio.to_thread.run_sync(mountd.status)
    assert answer["key"] in table and str(row["pid"]) in table and "running" in table
    assert f"ro  vol-status  {target}" in table
    listed = json.loads(await trio.to_thread.run_sync(mountd.status, "--json"))
    assert listed == [row]
    await mountd.client.unpublish("vol-status", target)


def test_status_into_a_closed_pipe_exits_quietly(mountd):
    """`fusecsi mountd status | head` must not end in a BrokenPipeError traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first write: EPIPE for certain
    try:
        args = [*FUSECSI, "mountd", "status", "--socket", f"unix://{mountd.socket}"]
        for extra in ([], ["--json"]):
            done = subprocess.run(
                args + extra, stdout=write_end, stderr=subprocess.PIPE, timeout=30, check=False
            )
            assert done.returncode == 0 and done.stderr == b"", done.stderr.decode()
    finally:
        os.close(write_end)


async def test_a_second_mountd_on_the_same_state_is_refused_and_touches_nothing(mountd, cluster):
    await make_dirs(cluster, "/twice/v")
    target = mountd.target("pod-1", "v")
    await mountd.publish("vol-twice", "/twice", "v", target)
    args = [
        *FUSECSI,
        "mountd",
        "--state-dir",
        str(mountd.state_dir),
        "--socket",
        f"unix://{mountd.base}/second.sock",
        "--kubelet-dir",
        str(mountd.kubelet_dir),
    ]
    second = await trio.run_process(args, capture_stderr=True, check=False)
    assert second.returncode == 1
    assert b"another mountd is running" in second.stderr
    assert read_write(target, "f", "still served by the first mountd")
    assert mountd.fuse_mounts()[1] == [target]
    await mountd.client.unpublish("vol-twice", target)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        return answer.read().decode()


async def test_racing_publishes_onto_one_target_bind_exactly_one_volume(mountd, cluster):
    await make_dirs(cluster, *(f"/race/v{i}" for i in range(8)))
    target = mountd.target("pod-race", "pv")
    outcomes = []

    async def publish(i):
        try:
            await mountd.publish(f"vol{i}", "/race", f"v{i}", target)
            outcomes.append(f"vol{i}")
        except RPCError as exc:
            outcomes.append(errno_of(exc))

    async with trio.open_nursery() as nursery:
        for i in range(8):
            nursery.start_soon(publish, i)
    winners = [o for o in outcomes if o.startswith("vol")]
    assert len(winners) == 1 and outcomes.count("EEXIST") == 7
    [row] = await mountd.client.list()
    assert [r["volume_id"] for r in row["refs"]] == winners
    assert (
        mountd.fuse_mounts()[1] == [target]
        and mounts.top_mount(target).root == f"/v{winners[0][3:]}"
    )
    await mountd.client.unpublish(winners[0], target)
