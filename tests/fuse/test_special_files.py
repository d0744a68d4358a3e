"""What pjdfstest checks and fusecsi once got wrong: FIFOs, sockets and device nodes are
inodes on the cluster (the kernel does their I/O), a file unlinked while open has no links
left, and a name longer than 255 bytes is ENAMETOOLONG even where the mount knows every
name of the directory."""

from __future__ import annotations

import errno
import os
import socket
import stat
import threading

import pytest


def test_fifos_sockets_and_devices(mnt, make_mount):
    os.mkfifo(mnt / "fifo", 0o640)
    os.mknod(mnt / "chr", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    os.mknod(mnt / "blk", stat.S_IFBLK | 0o660, os.makedev(7, 0))
    os.mknod(mnt / "fifo2", stat.S_IFIFO | 0o600)
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(mnt / "sock"))
        server.listen()
        with socket.socket(socket.AF_UNIX) as client:  # the kernel carries the connection
            client.connect(str(mnt / "sock"))
            conn, _ = server.accept()
            client.sendall(b"hi")
            assert conn.recv(2) == b"hi"
            conn.close()
    kinds = {"fifo": stat.S_ISFIFO, "fifo2": stat.S_ISFIFO, "chr": stat.S_ISCHR}
    kinds |= {"blk": stat.S_ISBLK, "sock": stat.S_ISSOCK}
    for name, is_kind in kinds.items():
        assert is_kind(os.lstat(mnt / name).st_mode), name
    assert os.lstat(mnt / "chr").st_rdev == os.makedev(1, 3)
    assert os.lstat(mnt / "blk").st_rdev == os.makedev(7, 0)
    assert stat.S_IMODE(os.lstat(mnt / "fifo").st_mode) == 0o640

    got = []  # a FIFO passes bytes between two processes (here: threads)
    reader = threading.Thread(target=lambda: got.append(open(mnt / "fifo", "rb").read()))
    reader.start()
    with open(mnt / "fifo", "wb") as w:
        w.write(b"through the pipe")
    reader.join(10)
    assert got == [b"through the pipe"]
    with pytest.raises(PermissionError):  # FUSE mounts are nodev: a node is never a way in
        open(mnt / "chr", "rb")

    os.chmod(mnt / "blk", 0o604)
    os.chown(mnt / "blk", 12, 34)
    os.utime(mnt / "blk", ns=(10**9, 2 * 10**9), follow_symlinks=False)
    st = os.lstat(mnt / "blk")
    assert stat.S_ISBLK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o604
    assert (st.st_uid, st.st_gid, st.st_mtime_ns) == (12, 34, 2 * 10**9)
    os.link(mnt / "blk", mnt / "blk-link")
    assert os.lstat(mnt / "blk").st_nlink == 2
    os.rename(mnt / "fifo2", mnt / "renamed")
    os.rename(mnt / "chr", mnt / "blk-link")  # over a special file too
    assert os.lstat(mnt / "blk").st_nlink == 1
    # another mount (another daemon) sees the same inodes
    other = make_mount(mnt.fs_path, name="other")
    assert os.lstat(other / "blk-link").st_rdev == os.makedev(1, 3)
    assert stat.S_ISFIFO(os.lstat(other / "renamed").st_mode)
    for name in ("fifo", "blk", "blk-link", "sock", "renamed"):
        os.unlink(mnt / name)
    assert os.listdir(mnt.path) == []


def test_a_file_unlinked_while_open_has_no_links(mnt):
    (mnt / "f").write_bytes(b"data")
    (mnt / "g").write_bytes(b"other")
    with open(mnt / "f", "rb") as f, open(mnt / "g", "rb") as g:
        assert os.fstat(f.fileno()).st_nlink == 1
        os.unlink(mnt / "f")
        (mnt / "new").write_bytes(b"new")
        os.rename(mnt / "new", mnt / "g")  # renamed over: g's old file has no name left
        for handle in (f, g):
            assert os.fstat(handle.fileno()).st_nlink == 0
        assert f.read() == b"data" and g.read() == b"other"


def test_a_name_too_long_is_refused_before_any_cache(mnt):
    (mnt / "d").mkdir()  # made here: the mount knows its every name (listings.py)
    os.listdir(mnt / "d")
    for name in ("x" * 256, "é" * 128):
        for call in (os.stat, os.lstat, os.unlink, os.mkdir, os.rmdir):
            with pytest.raises(OSError) as caught:
                call(mnt / "d" / name)
            assert caught.value.errno == errno.ENAMETOOLONG, (call, caught.value)
        with pytest.raises(OSError) as caught:
            os.rename(mnt / "d", mnt / "d" / name)
        assert caught.value.errno == errno.ENAMETOOLONG
    (mnt / "d" / ("y" * 255)).write_bytes(b"")  # the longest name works
    assert os.listdir(mnt / "d") == ["y" * 255]
