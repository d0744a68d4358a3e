"""POSIX behaviour through a real mount of a real cluster."""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import subprocess

import pytest

NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"  # the venv's interpreter lives under root-only /root


def test_create_write_read_append_overwrite_truncate(mnt):
    path = mnt / "f"
    path.write_bytes(b"hello")
    assert path.read_bytes() == b"hello"
    with open(path, "ab") as f:
        f.write(b" world")
    assert path.read_bytes() == b"hello world"
    with open(path, "r+b") as f:
        f.seek(6)
        f.write(b"WORLD")
    assert path.read_bytes() == b"hello WORLD"
    os.truncate(path, 5)
    assert path.read_bytes() == b"hello" and path.stat().st_size == 5
    with open(path, "r+b") as f:
        f.truncate(8)
    assert path.read_bytes() == b"hello\0\0\0"
    path.write_bytes(b"new")  # O_TRUNC
    assert path.read_bytes() == b"new"


def test_sparse_file_reads_zeros_in_holes(mnt):
    path = mnt / "sparse"
    with open(path, "wb") as f:
        f.seek(10 << 20)
        f.write(b"end")
        f.seek(4096)
        f.write(b"mid")
    data = path.read_bytes()
    assert len(data) == (10 << 20) + 3
    assert data[4096:4099] == b"mid" and data[-3:] == b"end"
    assert data[:4096] == bytes(4096) and data[4099 : 10 << 20] == bytes((10 << 20) - 4099)


def test_exclusive_create_and_errors(mnt):
    (mnt / "x").write_bytes(b"")
    with pytest.raises(FileExistsError):
        os.open(mnt / "x", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    with pytest.raises(FileNotFoundError):
        (mnt / "missing").read_bytes()
    (mnt / "d").mkdir()
    (mnt / "d" / "child").write_bytes(b"1")
    with pytest.raises(OSError) as caught:
        os.rmdir(mnt / "d")
    assert caught.value.errno == errno.ENOTEMPTY
    with pytest.raises(IsADirectoryError):
        open(mnt / "d", "wb")
    with pytest.raises(NotADirectoryError):
        os.listdir(mnt / "x")


def test_rename_over_existing_and_flags(mnt):
    (mnt / "a").write_bytes(b"A")
    (mnt / "b").write_bytes(b"B")
    os.rename(mnt / "a", mnt / "b")
    assert not (mnt / "a").exists() and (mnt / "b").read_bytes() == b"A"
    (mnt / "c").write_bytes(b"C")
    assert renameat2(mnt / "c", mnt / "b", RENAME_NOREPLACE) == errno.EEXIST
    assert renameat2(mnt / "c", mnt / "b", RENAME_EXCHANGE) == 0
    assert (mnt / "b").read_bytes() == b"C" and (mnt / "c").read_bytes() == b"A"
    (mnt / "dir1").mkdir()
    (mnt / "dir1" / "in").write_bytes(b"i")
    os.rename(mnt / "dir1", mnt / "dir2")
    assert (mnt / "dir2" / "in").read_bytes() == b"i"
    assert sorted(os.listdir(mnt.path)) == ["b", "c", "dir2"]


def test_unlink_and_rename_over_while_open(mnt):
    path = mnt / "open"
    path.write_bytes(b"x" * 300_000)
    with open(path, "rb") as f:
        os.unlink(path)
        assert not path.exists() and os.listdir(mnt.path) == []
        assert f.read() == b"x" * 300_000
        assert os.fstat(f.fileno()).st_size == 300_000
    (mnt / "target").write_bytes(b"old contents")
    with open(mnt / "target", "rb") as old:
        (mnt / "new").write_bytes(b"new contents")
        os.rename(mnt / "new", mnt / "target")
        assert (mnt / "target").read_bytes() == b"new contents"
        assert old.read() == b"old contents"
    assert sorted(os.listdir(mnt.path)) == ["target"]
    # a file with another name left is not moved aside: the other name still works
    (mnt / "h1").write_bytes(b"linked")
    os.link(mnt / "h1", mnt / "h2")
    with open(mnt / "h1", "rb") as f:
        os.unlink(mnt / "h1")
        assert f.read() == b"linked" and (mnt / "h2").read_bytes() == b"linked"


def test_symlinks_and_hard_links(mnt):
    (mnt / "real").write_bytes(b"data")
    os.symlink("real", mnt / "link")
    assert os.readlink(mnt / "link") == "real"
    assert (mnt / "link").read_bytes() == b"data"
    assert stat.S_ISLNK(os.lstat(mnt / "link").st_mode)
    os.symlink("/nowhere/at/all", mnt / "dangling")
    assert os.readlink(mnt / "dangling") == "/nowhere/at/all"
    os.link(mnt / "real", mnt / "hard")
    assert os.stat(mnt / "real").st_nlink == 2
    assert os.stat(mnt / "hard").st_ino == os.stat(mnt / "real").st_ino
    with open(mnt / "hard", "ab") as f:
        f.write(b"+more")
    assert (mnt / "real").read_bytes() == b"data+more"
    os.unlink(mnt / "real")
    assert os.stat(mnt / "hard").st_nlink == 1


def test_chmod_chown_utimens(mnt):
    path = mnt / "attrs"
    path.write_bytes(b"")
    os.chmod(path, 0o640)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    os.chown(path, 1234, 5678)
    st = path.stat()
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    os.utime(path, ns=(1_000_000_000_123, 2_000_000_000_456))
    st = path.stat()
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_000_123, 2_000_000_000_456)
    os.utime(path)  # now
    assert path.stat().st_mtime > 1_000_000


def test_deep_tree_mkdir_p_and_remove(mnt):
    deep = mnt.path.joinpath(*[f"level{i}" for i in range(40)])
    os.makedirs(deep)
    (deep / "leaf").write_bytes(b"leaf")
    assert (deep / "leaf").read_bytes() == b"leaf"
    subprocess.run(["rm", "-rf", str(mnt / "level0")], check=True)
    assert os.listdir(mnt.path) == []


async def _create_many(client, path, names):
    directory = await client.mkdirs(path)
    for start in range(0, len(names), 2000):
        await client.create_batch(directory.ino, names[start : start + 2000])


def test_readdir_of_ten_thousand_entries(mnt, on_cluster):
    names = [f"entry-{i:05d}".encode() for i in range(10_000)]
    on_cluster(_create_many, mnt.fs_path + "/big", names)  # bulk-made: the listing is tested
    big = mnt / "big"
    os.close(os.open(big / "made-here", os.O_CREAT | os.O_WRONLY, 0o644))
    want = {n.decode() for n in names} | {"made-here"}
    assert sorted(os.listdir(big)) == sorted(want)  # each exactly once
    with os.scandir(big) as entries:  # readdirplus attributes are right
        assert all(e.is_file() and e.stat().st_size == 0 for e in entries)
    os.unlink(big / "entry-05000")
    assert len(os.listdir(big)) == 10_000


def test_user_xattrs_and_reserved_names(mnt):
    path = mnt / "x"
    path.write_bytes(b"")
    os.setxattr(path, "user.color", b"blue")
    assert os.getxattr(path, "user.color") == b"blue"
    assert "user.color" in os.listxattr(path)
    os.removexattr(path, "user.color")
    with pytest.raises(OSError) as caught:
        os.getxattr(path, "user.color")
    assert caught.value.errno == errno.ENODATA
    for name in ("trusted.fusecsi.volume", "user.fusecsi.quota"):
        with pytest.raises(PermissionError):
            os.setxattr(mnt.path, name, b"1")
    with pytest.raises(PermissionError):
        os.getxattr(mnt.path, "trusted.fusecsi.volume")
    with pytest.raises(OSError) as caught:  # no quota on this tree
        os.getxattr(mnt.path, "user.fusecsi.quota")
    assert caught.value.errno == errno.ENODATA


def test_statfs(mnt):
    st = os.statvfs(mnt.path)
    assert st.f_blocks > 0 and st.f_bsize > 0 and st.f_namemax == 255


def as_nobody(code: str, *args: str) -> subprocess.CompletedProcess:
    """Run Python code as an unprivileged user; it prints the errno name it hit."""

    def drop():
        os.setgid(NOBODY)
        os.setgroups([])
        os.setuid(NOBODY)

    return subprocess.run(
        [SYSTEM_PYTHON, "-c", code, *args],
        preexec_fn=drop,
        capture_output=True,
        text=True,
        timeout=60,
    )


PROBE = """
import errno, os, sys
op, path = sys.argv[1], sys.argv[2]
try:
    if op == "read":
        open(path, "rb").read()
    elif op == "write":
        open(path, "ab").write(b"x")
    elif op == "create":
        open(path, "wb").close()
    elif op == "chmod":
        os.chmod(path, 0o777)
    elif op == "unlink":
        os.unlink(path)
    print("ok")
except OSError as exc:
    print(errno.errorcode[exc.errno])
"""


def test_permission_denials_for_an_unprivileged_user(make_mount, fs_path, public_dir):
    mnt = make_mount(fs_path, where=public_dir / "mnt")
    os.chmod(mnt.path, 0o755)
    secret = mnt / "secret"
    secret.write_bytes(b"s")
    os.chmod(secret, 0o600)
    public = mnt / "public"
    public.write_bytes(b"p")
    os.chmod(public, 0o644)
    shared = mnt / "shared"
    shared.mkdir(mode=0o777)
    os.chmod(shared, 0o777)

    def probe(op, path):
        return as_nobody(PROBE, op, str(path)).stdout.strip()

    assert probe("read", secret) == "EACCES"
    assert probe("read", public) == "ok"
    assert probe("write", public) == "EACCES"
    assert probe("create", mnt / "new") == "EACCES"
    assert probe("chmod", public) == "EPERM"
    assert probe("unlink", public) == "EACCES"
    assert probe("create", shared / "mine") == "ok"
    st = (shared / "mine").stat()
    assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY)


RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
_libc = ctypes.CDLL(None, use_errno=True)


def renameat2(old, new, flags: int) -> int:
    """renameat2(2) with flags; 0 or the errno."""
    at_fdcwd = -100
    rc = _libc.renameat2(at_fdcwd, os.fsencode(old), at_fdcwd, os.fsencode(new), flags)
    return 0 if rc == 0 else ctypes.get_errno()
