"""mountd's pieces that need no cluster: mountinfo, syscalls on tmpfs, keys, the table."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import subprocess

import pytest
import trio
import trio.testing

from fusecsi import mount_options
from fusecsi.engines.embedded import NODE as EMBEDDED
from fusecsi.locks import KeyedLocks, acquire
from fusecsi.mountd import mounts
from fusecsi.mountd.table import Entry, Key, Ref, Table, write_atomic

SAMPLE = (
    "22 27 0:21 / /proc rw,relatime - proc proc rw\n"
    "90 27 0:55 /vol/a\\040b /var/lib/kubelet/pods/x/mount rw,nosuid - fuse.fusecsi "
    "fusecsi:127.0.0.1:8995:/base rw,user_id=0\n"
    "91 27 0:55 / /mnt/with\\134slash ro,relatime shared:5 - tmpfs tmpfs rw\n"
)


def test_parse_mountinfo_unescapes_and_reads_tail_fields():
    entries = mounts.parse_mountinfo(SAMPLE)
    assert [e.mountpoint for e in entries] == [
        "/proc",
        "/var/lib/kubelet/pods/x/mount",
        "/mnt/with\\slash",
    ]
    fuse = entries[1]
    assert fuse.root == "/vol/a b"
    assert fuse.fstype == EMBEDDED.fstype and mounts.is_mount_of(fuse, EMBEDDED.fstype)
    assert fuse.source == "fusecsi:127.0.0.1:8995:/base"
    assert not fuse.readonly and entries[2].readonly
    assert mounts.top_mount("/proc", entries).mount_id == 22
    assert mounts.top_mount("/nope", entries) is None


def test_keys_share_across_spellings_and_split_on_path_or_options():
    a = Key.normalized(EMBEDDED, "127.0.0.1:8995", "/base/", "")
    b = Key.normalized(EMBEDDED, "127.0.0.1", "/base", "attr-timeout=1.0")
    assert a == b and a.id == b.id and len(a.id) == 16
    assert Key.normalized(EMBEDDED, "127.0.0.1", "/other", "").id != a.id
    digest = mount_options.parse_arg("").digest()  # the contract's key id, spelled out
    assert a.id == hashlib.sha256(f"127.0.0.1:8995|/base|{digest}".encode()).hexdigest()[:16]
    assert Key.normalized(EMBEDDED, "127.0.0.1", "/base", "attr-timeout=2").id != a.id
    for bad, message in (
        (("", "/base", ""), "master-addrs is empty"),
        (("127.0.0.1", "rel", ""), "fs-path 'rel' must be an absolute path"),
        (("127.0.0.1", "/b", "nope=1"), "unknown mount option 'nope'"),
    ):
        with pytest.raises(ValueError, match=re.escape(message)):
            Key.normalized(EMBEDDED, *bad)


def test_table_round_trips_through_an_atomic_0600_file(tmp_path):
    table = Table(str(tmp_path / "table.json"))
    key = Key.normalized(EMBEDDED, "127.0.0.1", "/base", "")
    entry = Entry(key, "/state/mounts/" + key.id, pid=123, restarts=2)
    entry.refs["/k/t1"] = Ref("vol-1", "/k/t1", "pv1", False)
    entry.refs["/k/t2"] = Ref("vol-1", "/k/t2", "pv1", True)
    table.entries[key.id] = entry
    write_atomic(table.path, table.snapshot())
    assert os.stat(table.path).st_mode & 0o777 == 0o600
    assert os.listdir(tmp_path) == ["table.json"]
    again = Table(table.path)
    again.load()
    assert again.entries[key.id].to_json() == entry.to_json()
    assert again.by_target("/k/t2")[1].readonly is True
    assert again.by_target("/k/t3") is None


def test_a_table_from_before_engines_loads_as_the_embedded_engine_with_the_same_ids(tmp_path):
    key = Key.normalized(EMBEDDED, "127.0.0.1", "/base", "")
    old = {
        "version": 1,
        "entries": [
            {
                "key": {"master_addrs": key.address, "fs_path": "/base", "options": key.options},
                "mountpoint": "/state/mounts/" + key.id,
                "pid": 7,
                "restarts": 0,
                "refs": [],
            }
        ],
    }
    (tmp_path / "table.json").write_text(json.dumps(old))
    table = Table(str(tmp_path / "table.json"))
    table.load()
    [(key_id, entry)] = table.entries.items()
    assert entry.key == key and key_id == key.id and entry.key.engine == "embedded"
    assert entry.secrets_digest == ""
    # another engine with the same address, path and options is another daemon
    other = Key("other", key.address, key.fs_path, key.options)
    assert other.id != key.id


def test_missing_table_loads_empty_and_a_foreign_version_is_refused(tmp_path):
    table = Table(str(tmp_path / "table.json"))
    table.load()
    assert table.entries == {}
    (tmp_path / "table.json").write_text('{"version": 99, "entries": []}')
    with pytest.raises(ValueError, match="version"):
        table.load()


@pytest.fixture
def tmpfs(tmp_path):
    """A real tmpfs at tmp_path/src; every mount under tmp_path is removed afterwards."""
    src = tmp_path / "src"
    src.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(src)], check=True)
    try:
        yield src
    finally:
        for entry in mounts.mounts_under(str(tmp_path)):
            subprocess.run(["umount", "-l", entry.mountpoint], check=False)


def test_bind_beneath_binds_a_subdirectory_and_unmount_all_clears_stacks(tmpfs, tmp_path):
    (tmpfs / "a" / "b").mkdir(parents=True)
    (tmpfs / "a" / "b" / "file").write_text("data")
    target = tmp_path / "target"
    target.mkdir()
    mounts.bind_beneath(str(tmpfs), "a/b", str(target))
    mounts.bind_beneath(str(tmpfs), "a", str(target))  # stacked on top
    top = mounts.top_mount(str(target))
    assert top.fstype == "tmpfs" and top.root == "/a"
    assert (target / "b" / "file").read_text() == "data"
    assert mounts.unmount_all(str(target)) == 2
    assert mounts.top_mount(str(target)) is None
    assert os.listdir(target) == []
    assert mounts.unmount_all(str(target)) == 0


def test_bind_beneath_refuses_symlinks_and_reports_missing_paths(tmpfs, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmpfs / "escape").symlink_to(outside)
    (tmpfs / "afile").write_text("x")
    target = tmp_path / "target"
    target.mkdir()
    for subpath, code in (
        ("escape", errno.ENOTDIR),
        ("missing", errno.ENOENT),
        ("afile", errno.ENOTDIR),
    ):
        with pytest.raises(OSError) as info:
            mounts.bind_beneath(str(tmpfs), subpath, str(target))
        assert info.value.errno == code, subpath
        assert mounts.top_mount(str(target)) is None
    link = tmp_path / "link"
    link.symlink_to(target)
    (tmpfs / "ok").mkdir()
    with pytest.raises(OSError) as info:
        mounts.bind_beneath(str(tmpfs), "ok", str(link))  # a symlinked target is not followed
    assert info.value.errno == errno.ENOTDIR
    assert mounts.top_mount(str(target)) is None


def test_remount_readonly_makes_only_the_bind_read_only_and_keeps_its_flags(tmpfs, tmp_path):
    (tmpfs / "v").mkdir()
    subprocess.run(["mount", "-o", "remount,nosuid,nodev,noexec", str(tmpfs)], check=True)
    target = tmp_path / "target"
    target.mkdir()
    mounts.bind_beneath(str(tmpfs), "v", str(target))
    mounts.remount_readonly(str(target))
    entry = mounts.top_mount(str(target))
    assert entry.readonly
    assert {"nosuid", "nodev", "noexec"} <= set(entry.options.split(","))
    with pytest.raises(OSError) as info:
        (target / "f").write_text("x")
    assert info.value.errno == errno.EROFS
    (tmpfs / "v" / "f").write_text("still writable at the source")
    assert (target / "f").read_text() == "still writable at the source"
    mounts.unmount_all(str(target))


async def test_keyed_locks_serialise_one_name_and_let_others_run():
    locks = KeyedLocks()
    order = []

    release_a = trio.Event()

    async def hold(name, tag, until=None, *, task_status=trio.TASK_STATUS_IGNORED):
        async with locks.hold(name):
            order.append(f"{tag}+")
            task_status.started()
            if until is not None:
                await until.wait()
            order.append(f"{tag}-")

    async with trio.open_nursery() as nursery:
        await nursery.start(hold, "k", "a", release_a)  # a holds "k" from here on
        nursery.start_soon(hold, "k", "b")
        await nursery.start(hold, "other", "c")  # another name is not held up by a
        await trio.testing.wait_all_tasks_blocked()
        assert order == ["a+", "c+", "c-"]  # b waits for "k"
        assert locks.busy("k")
        release_a.set()
    assert order.index("a-") < order.index("b+")
    assert order.index("c+") < order.index("a-")
    assert not locks.busy("k") and not locks.busy("other")


async def test_acquire_takes_a_free_lock_before_anything_else_runs():
    """A free lock or semaphore is taken without a schedule point (a task started earlier
    has not run yet); a busy one is waited for as usual."""
    ran = []
    lock, window = trio.Lock(), trio.Semaphore(1)

    async def other() -> None:
        ran.append("other")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        await acquire(lock)
        await acquire(window)
        assert ran == []
        nursery.start_soon(acquire, window)  # busy: waits for the release
        await trio.testing.wait_all_tasks_blocked()
        assert window.value == 0 and ran == ["other"]
        window.release()
    assert window.value == 0
    lock.release()


def test_top_mount_finds_paths_that_mountinfo_escapes(tmpfs, tmp_path):
    (tmpfs / "v").mkdir()
    odd = tmp_path / "a b\\c\td"
    odd.mkdir()
    assert mounts.top_mount(str(odd)) is None
    mounts.bind_beneath(str(tmpfs), "v", str(odd))
    found = mounts.top_mount(str(odd))
    assert found is not None and found.root == "/v" and found.mountpoint == str(odd)
    assert mounts.top_mount(str(tmp_path / "a b")) is None
    assert mounts.unmount_all(str(odd)) == 1


def test_the_embedded_launch_keeps_the_token_off_argv_and_env():
    cluster = EMBEDDED.parse_cluster({"master-addrs": "Host-A:8995,host-a"}, {"token": "s3cr3t"})
    assert cluster.address == "host-a:8995" and cluster.secrets == {"token": "s3cr3t"}
    launch = EMBEDDED.launch(cluster, "/base", {"attr-timeout": "2"}, "/state/mounts/k")
    assert "s3cr3t" not in " ".join(launch.argv) and "s3cr3t" not in str(launch.env)
    assert launch.files == {"token": b"s3cr3t"} and launch.ready == "ready-fd"
    assert launch.argv[launch.argv.index("--token-file") + 1] == "{private}/token"
    assert launch.argv[-1] == "/state/mounts/k" and "{ready_fd}" in launch.argv
    # no token: no file and no --token-file
    bare = EMBEDDED.launch(EMBEDDED.parse_cluster({"master-addrs": "h"}, {}), "/", {}, "/m")
    assert bare.files == {} and "--token-file" not in bare.argv
    with pytest.raises(ValueError, match="master-addrs is empty"):
        EMBEDDED.parse_cluster({}, {"token": "t"})
