"""Missing names: negative entries the kernel caches for entry-timeout seconds, and
directories whose every name the daemon knows (a mkdir or a full readdir through the
mount), where it answers "absent" without asking the cluster. Real mounts on the test
cluster; names are created "elsewhere" with a cluster client of the test's own."""

from __future__ import annotations

import errno
import os
import time

import pytest
from support.mounts import drop_kernel_caches

from fusecsi.fuse.operations import ORPHANS

LONG = "entry-timeout=60,attr-timeout=60"  # nothing expires while a test runs


def create_elsewhere(on_cluster, fs_path: str, *names: str) -> None:
    """Create files through the cluster, bypassing the mount (another node's write)."""

    async def create(client):
        for name in names:
            directory, _, base = f"{fs_path}/{name}".rpartition("/")
            parent = await client.resolve(directory)
            await client.create(parent.ino, base.encode(), 0o644, 0, 0)

    on_cluster(create)


def missing(path) -> bool:
    try:
        os.stat(path)
    except FileNotFoundError:
        return True
    return False


def test_absence_is_cached_for_entry_timeout(make_mount, fs_path, on_cluster):
    m = make_mount(fs_path, LONG)
    assert missing(m / "x")
    create_elsewhere(on_cluster, fs_path, "x")
    assert missing(m / "x")  # the kernel holds the negative entry, as it would a positive one
    fresh = make_mount(fs_path, LONG, name="fresh")
    assert not missing(fresh / "x")
    with pytest.raises(FileExistsError):  # the cluster decides an exclusive create
        os.open(m / "x", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    os.close(os.open(m / "x", os.O_CREAT | os.O_WRONLY))  # plain O_CREAT opens it
    assert not missing(m / "x")


def test_changes_through_the_mount_replace_a_cached_absence(make_mount, fs_path):
    m = make_mount(fs_path, LONG)
    names = ["file", "dir", "moved", "sym", "hard", "mknod"]
    for name in names + ["source"]:
        assert missing(m / name)
    (m / "file").write_bytes(b"1")
    (m / "dir").mkdir()
    (m / "source").write_bytes(b"2")
    os.rename(m / "source", m / "moved")
    os.symlink("file", m / "sym")
    os.link(m / "file", m / "hard")
    os.mknod(m / "mknod", 0o600)
    for name in names:
        assert not missing(m / name), name
    assert missing(m / "source")
    assert sorted(os.listdir(m.path)) == sorted(names)
    assert (m / "sym").read_bytes() == b"1" and (m / "moved").read_bytes() == b"2"


def test_orphans_directory_stays_hidden(make_mount, fs_path, on_cluster):
    m = make_mount(fs_path, LONG)
    assert missing(m / ORPHANS.decode())
    with open(m / "open", "wb+") as f:
        f.write(b"still here")
        f.flush()
        os.unlink(m / "open")  # moved into the hidden directory until the last close
        assert missing(m / ORPHANS.decode())
        assert ORPHANS.decode() not in os.listdir(m.path)
        with pytest.raises(OSError) as caught:
            os.mkdir(m / ORPHANS.decode())
        assert caught.value.errno == errno.EEXIST
        f.seek(0)
        assert f.read() == b"still here"

    async def orphans(client):
        top = await client.resolve(fs_path)
        return await client.readdir((await client.lookup(top.ino, ORPHANS)).ino)

    # removed at the last close; the kernel sends RELEASE after close() has returned
    for _ in range(200):
        if not on_cluster(orphans):
            break
        time.sleep(0.05)
    assert on_cluster(orphans) == []
    assert missing(m / ORPHANS.decode()) and os.listdir(m.path) == []


def test_a_directory_made_here_answers_absent_names_itself(make_mount, fs_path, on_cluster):
    m = make_mount(fs_path, LONG)
    (m / "new").mkdir()
    create_elsewhere(on_cluster, fs_path, "new/elsewhere")
    # known empty since the mkdir: the daemon says absent without asking the cluster
    assert missing(m / "new" / "elsewhere")
    (m / "new" / "here").write_bytes(b"h")
    assert (m / "new" / "here").read_bytes() == b"h"
    os.unlink(m / "new" / "here")
    assert missing(m / "new" / "here")
    os.mkdir(m / "new" / "sub")
    os.rename(m / "new" / "sub", m / "new" / "sub2")
    assert missing(m / "new" / "sub") and (m / "new" / "sub2").is_dir()
    # a directory the mount did not make (and has not listed) is asked about every name
    create_elsewhere(on_cluster, fs_path, "other")
    (m / "plain").mkdir()
    assert missing(m / "plain" / "late")
    create_elsewhere(on_cluster, fs_path, "plain/later")
    assert missing(m / "plain" / "later")  # still within the listing's entry-timeout
    assert (m / "other").exists()


def test_a_complete_listing_expires_after_entry_timeout(make_mount, fs_path, on_cluster):
    m = make_mount(fs_path, "entry-timeout=1,attr-timeout=1")
    (m / "d").mkdir()
    time.sleep(1.5)  # longer than entry-timeout: the empty listing is no longer trusted
    create_elsewhere(on_cluster, fs_path, "d/x")
    assert not missing(m / "d" / "x")


def test_a_listing_in_use_is_read_again_and_still_sees_names_made_elsewhere(
    make_mount, fs_path, on_cluster
):
    """Creates keep a new directory's listing in use, so the daemon reads the directory
    again before the listing expires: a name made elsewhere is still seen within
    entry-timeout."""
    m = make_mount(fs_path, "entry-timeout=1,attr-timeout=1")
    (m / "busy").mkdir()
    made_elsewhere = None
    start = time.monotonic()
    i = 0
    while time.monotonic() - start < 3:
        os.close(os.open(m / "busy" / f"f{i}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        i += 1
        if made_elsewhere is None and time.monotonic() - start > 1:
            create_elsewhere(on_cluster, fs_path, "busy/elsewhere")
            made_elsewhere = time.monotonic()
    time.sleep(max(0.0, made_elsewhere + 1.5 - time.monotonic()))
    assert not missing(m / "busy" / "elsewhere")
    assert len(os.listdir(m / "busy")) == i + 1


def test_a_full_readdir_establishes_a_listing(make_mount, fs_path, on_cluster):
    async def fill(client):
        top = await client.resolve(fs_path)
        d = await client.mkdir(top.ino, b"big", 0o755, 0, 0)
        await client.create_batch(d.ino, [b"n%d" % i for i in range(1500)])  # two pages

    on_cluster(fill)
    m = make_mount(fs_path, LONG)
    assert len(os.listdir(m / "big")) == 1500
    create_elsewhere(on_cluster, fs_path, "big/after-listing")
    drop_kernel_caches()
    assert missing(m / "big" / "after-listing")  # answered from the listing
    for name in ("n0", "n999", "n1000", "n1499"):  # from both pages: present
        assert not missing(m / "big" / name), name
    # a directory the mount never listed asks the cluster
    create_elsewhere(on_cluster, fs_path, "unlisted")
    assert not missing(m / "unlisted")


def test_files_changed_here_are_not_answered_from_a_listing(make_mount, fs_path, on_cluster):
    """A listing keeps attributes from its directory read; every change this mount makes
    to a file drops them, so a lookup after it shows the change."""
    create_elsewhere(on_cluster, fs_path, "d", "w", "m", "l", "t", "x")
    m = make_mount(fs_path, LONG)
    assert sorted(os.listdir(m.path)) == ["d", "l", "m", "t", "w", "x"]
    drop_kernel_caches()
    assert os.stat(m / "d").st_size == 0  # from the listing
    (m / "w").write_bytes(b"hello")
    os.chmod(m / "m", 0o600)
    os.link(m / "l", m / "l2")
    os.truncate(m / "t", 5)
    os.setxattr(m / "x", "user.k", b"v")
    drop_kernel_caches()
    assert os.stat(m / "w").st_size == 5
    assert os.stat(m / "m").st_mode & 0o777 == 0o600
    assert os.stat(m / "l").st_nlink == 2
    assert os.stat(m / "t").st_size == 5
    assert os.getxattr(m / "x", "user.k") == b"v"
    fresh = make_mount(fs_path, LONG, name="fresh")
    for name in ("w", "m", "l", "t", "x"):
        here, there = os.stat(m / name), os.stat(fresh / name)
        assert (here.st_size, here.st_mode, here.st_nlink, here.st_ctime_ns) == (
            there.st_size,
            there.st_mode,
            there.st_nlink,
            there.st_ctime_ns,
        ), name
