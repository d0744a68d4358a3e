#!/usr/bin/env python3
"""A stand-in `curvine-fuse`, for tests only: it exists because no Curvine binary can be
obtained here. It is as small as the node-side test needs: it accepts exactly the flags
of curvine-fuse's source (as recorded in curvine_upstream.json: `readonly` and `debug`
are switches, every other flag takes a value), and does what the facts say the real one
does before serving: read the config file, refuse a non-empty mount directory, create a
missing fs-path on the master (unless read-only), mount with fstype fuse.curvinefs, and
unmount on SIGTERM. What it serves is an empty directory, not the cluster's data.
"""

from __future__ import annotations

import argparse
import errno
import json
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
    pyfuse3.init(EmptyRoot(), str(mnt), options)
    try:
        trio.run(serve)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
