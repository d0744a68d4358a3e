#!/usr/bin/env python3
"""A stand-in `curvine-fuse`, for tests only: it exists because no Curvine binary can be
obtained here. It is as small as the node-side test needs: it accepts exactly the flags
of curvine-fuse's source (as recorded in curvine_upstream.json: `readonly` and `debug`
are switches, every other flag takes a value), and does what the facts say the real one
does before serving: read the config file, refuse a non-empty mount directory, create a
missing fs-path on the master (unless read-only), mount with fstype fuse.curvinefs, and
unmount on SIGTERM. What it serves: with $CURVINE_STANDIN_ROOT set (the directory a
stand-in master keeps its namespace in, `DirTree`), that directory's fs-path subtree passed
through, so the master and the mount show the same files (the walkthrough runs on this);
without it, an empty directory.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import stat
import sys
from pathlib import Path

import pyfuse3
import trio

from fusecsi.engines.curvine.client import MasterClient

SWITCHES = {"readonly", "debug"}


def parse(argv: list[str]) -> argparse.Namespace:
    facts = json.loads(Path(__file__).with_name("curvine_upstream.json").read_text())
    parser = argparse.ArgumentParser(prog="curvine-fuse", allow_abbrev=False)
    for flag in facts["fuse_flags"]:
        if flag in SWITCHES:
            parser.add_argument(f"--{flag}", action="store_true")
        else:
            parser.add_argument(f"--{flag}")
    return parser.parse_args(argv)


class EmptyRoot(pyfuse3.Operations):
    async def getattr(self, inode, ctx=None):
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOENT)
        attr = pyfuse3.EntryAttributes()
        attr.st_ino, attr.st_mode, attr.st_nlink = inode, stat.S_IFDIR | 0o755, 2
        return attr

    async def lookup(self, parent_inode, name, ctx=None):
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def opendir(self, inode, ctx):
        return inode

    async def readdir(self, fh, start_id, token):
        return

    async def statfs(self, ctx):
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        data.f_blocks, data.f_bfree, data.f_bavail = 1000, 600, 600
        return data


ROOT_ENV = "CURVINE_STANDIN_ROOT"


def _os(call, *args, **kwargs):
    try:
        return call(*args, **kwargs)
    except OSError as exc:
        raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None


class Passthrough(pyfuse3.Operations):
    """A directory of this machine served as it is: inodes are its real inode numbers."""

    def __init__(self, root: str) -> None:
        super().__init__()
        self.root = root
        self.paths = {pyfuse3.ROOT_INODE: root}

    def _path(self, inode: int, name: bytes = b"") -> str:
        if inode not in self.paths:
            raise pyfuse3.FUSEError(errno.ESTALE)
        return os.path.join(self.paths[inode], os.fsdecode(name)) if name else self.paths[inode]

    def _attr(self, path: str) -> pyfuse3.EntryAttributes:
        st = _os(os.lstat, path)
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = pyfuse3.ROOT_INODE if path == self.root else st.st_ino
        for name in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size"):
            setattr(attr, name, getattr(st, name))
        attr.st_blocks, attr.st_blksize = st.st_blocks, 4096
        attr.st_atime_ns, attr.st_mtime_ns = st.st_atime_ns, st.st_mtime_ns
        attr.st_ctime_ns = st.st_ctime_ns
        self.paths[attr.st_ino] = path
        return attr

    async def lookup(self, parent_inode, name, ctx=None):
        return self._attr(self._path(parent_inode, name))

    async def getattr(self, inode, ctx=None):
        return self._attr(self._path(inode))

    async def setattr(self, inode, attr, fields, fh, ctx):
        path = self._path(inode)
        if fields.update_size:
            _os(os.truncate, fh if fh is not None else path, attr.st_size)
        if fields.update_mode:
            _os(os.chmod, path, stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            uid = attr.st_uid if fields.update_uid else -1
            gid = attr.st_gid if fields.update_gid else -1
            _os(os.chown, path, uid, gid, follow_symlinks=False)
        if fields.update_atime or fields.update_mtime:
            st = _os(os.lstat, path)
            atime = attr.st_atime_ns if fields.update_atime else st.st_atime_ns
            mtime = attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns
            _os(os.utime, path, ns=(atime, mtime), follow_symlinks=False)
        return self._attr(path)

    async def opendir(self, inode, ctx):
        return inode

    async def readdir(self, fh, start_id, token):
        path = self._path(fh)
        names = sorted(_os(os.listdir, path))
        for index in range(start_id, len(names)):
            entry = os.path.join(path, names[index])
            try:
                attr = self._attr(entry)
            except pyfuse3.FUSEError:
                continue  # removed while listed
            if not pyfuse3.readdir_reply(token, os.fsencode(names[index]), attr, index + 1):
                return

    async def open(self, inode, flags, ctx):
        return pyfuse3.FileInfo(fh=_os(os.open, self._path(inode), flags & ~os.O_CREAT))

    async def create(self, parent_inode, name, mode, flags, ctx):
        path = self._path(parent_inode, name)
        fd = _os(os.open, path, flags | os.O_CREAT, mode)
        return pyfuse3.FileInfo(fh=fd), self._attr(path)

    async def read(self, fh, off, size):
        return _os(os.pread, fh, size, off)

    async def write(self, fh, off, buf):
        return _os(os.pwrite, fh, buf, off)

    async def fsync(self, fh, datasync):
        _os(os.fdatasync if datasync else os.fsync, fh)

    async def release(self, fh):
        os.close(fh)

    async def mkdir(self, parent_inode, name, mode, ctx):
        path = self._path(parent_inode, name)
        _os(os.mkdir, path, mode)
        return self._attr(path)

    async def rmdir(self, parent_inode, name, ctx):
        _os(os.rmdir, self._path(parent_inode, name))

    async def unlink(self, parent_inode, name, ctx):
        _os(os.unlink, self._path(parent_inode, name))

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        if flags:
            raise pyfuse3.FUSEError(errno.EINVAL)
        old = self._path(parent_inode_old, name_old)
        new = self._path(parent_inode_new, name_new)
        _os(os.rename, old, new)
        for inode, path in list(self.paths.items()):
            if path == old or path.startswith(old + "/"):
                self.paths[inode] = new + path[len(old) :]

    async def getxattr(self, inode, name, ctx):
        return _os(os.getxattr, self._path(inode), os.fsdecode(name), follow_symlinks=False)

    async def listxattr(self, inode, ctx):
        names = _os(os.listxattr, self._path(inode), follow_symlinks=False)
        return [os.fsencode(name) for name in names]

    async def setxattr(self, inode, name, value, ctx):
        _os(os.setxattr, self._path(inode), os.fsdecode(name), value, follow_symlinks=False)

    async def removexattr(self, inode, name, ctx):
        _os(os.removexattr, self._path(inode), os.fsdecode(name), follow_symlinks=False)

    async def statfs(self, ctx):
        st = _os(os.statvfs, self.root)
        data = pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail"):
            setattr(data, name, getattr(st, name))
        for name in ("f_files", "f_ffree", "f_favail", "f_namemax"):
            setattr(data, name, getattr(st, name))
        return data


async def ensure_fs_path(args: argparse.Namespace) -> None:
    async with MasterClient(args.master_addrs, timeout=5) as client:
        try:
            status = await client.file_status(args.fs_path)
        except FileNotFoundError:
            if args.readonly:
                raise OSError(errno.EROFS, f"{args.fs_path} missing, mount read-only") from None
            await client.mkdir(args.fs_path, create_parent=True)
            return
        if not status.is_dir:
            raise NotADirectoryError(errno.ENOTDIR, args.fs_path)


async def serve() -> None:
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pyfuse3.main)
            async for _ in signals:
                pyfuse3.terminate()
                return


def main() -> int:
    args = parse(sys.argv[1:])
    Path(args.conf).read_text()  # the real one fails without a readable config file
    mnt = Path(args.mnt_path)
    if any(mnt.iterdir()):
        print(f"Mnt {mnt} is not empty", file=sys.stderr)
        return 1
    trio.run(ensure_fs_path, args)
    options = {"fsname=curvinefs", "subtype=curvinefs"} | ({"ro"} if args.readonly else set())
    root = os.environ.get(ROOT_ENV)
    served = Passthrough(os.path.join(root, args.fs_path.lstrip("/"))) if root else EmptyRoot()
    pyfuse3.init(served, str(mnt), options)
    try:
        trio.run(serve)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
