"""`fusecsi fs`: look at and change a cluster from the command line (like curvine-cli fs)."""

from __future__ import annotations

import errno
import json
import os
import stat
import sys
import time

import outcome
import trio

from fusecsi import errors
from fusecsi.cluster import roles
from fusecsi.cluster.client import Attr, ClusterClient, ClusterError, ClusterUnavailable
from fusecsi.tokens import TOKEN_ENV, load_token

CHUNK = 8 << 20


def configure(parser) -> None:
    parser.add_argument("--master-addrs", required=True, metavar="A[,B]", help=roles.MASTERS_HELP)
    parser.add_argument(
        "--token-file",
        metavar="F",
        help=f"file holding the cluster token (or set {TOKEN_ENV})",
    )
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    sub = parser.add_subparsers(dest="fs_command", metavar="ACTION", required=True)
    p = sub.add_parser("ls", help="list a directory")
    p.add_argument("path", nargs="?", default="/")
    p = sub.add_parser("stat", help="show a path's attributes")
    p.add_argument("path")
    p = sub.add_parser("mkdir", help="make a directory")
    p.add_argument("-p", "--parents", action="store_true")
    p.add_argument("path")
    p = sub.add_parser("rm", help="remove a file or (with -r) a tree")
    p.add_argument("-r", "--recursive", action="store_true")
    p.add_argument("path")
    p = sub.add_parser("mv", help="rename")
    p.add_argument("src")
    p.add_argument("dst")
    p = sub.add_parser("put", help="copy a local file into the cluster")
    p.add_argument("local")
    p.add_argument("path")
    p = sub.add_parser("get", help="copy a cluster file to a local path ('-' for stdout)")
    p.add_argument("path")
    p.add_argument("local")
    p = sub.add_parser("quota", help="show or set a directory quota")
    p.add_argument("path")
    p.add_argument("--max-bytes", type=int)
    p.add_argument("--max-inodes", type=int)
    p.add_argument("--clear", action="store_true", help="remove the quota")
    sub.add_parser("df", help="cluster capacity and free space")


def split(path: str) -> tuple[str, bytes]:
    parts = [p for p in path.split("/") if p]
    if not path.startswith("/") or not parts:
        raise ValueError(f"{path!r}: expected an absolute path below /")
    return "/" + "/".join(parts[:-1]), parts[-1].encode()


def describe(name: str, attr: Attr) -> dict:
    return {
        "name": name,
        "ino": attr.ino,
        "type": "dir"
        if stat.S_ISDIR(attr.mode)
        else "symlink"
        if stat.S_ISLNK(attr.mode)
        else "file",
        "mode": oct(stat.S_IMODE(attr.mode)),
        "nlink": attr.nlink,
        "uid": attr.uid,
        "gid": attr.gid,
        "size": attr.size,
        "mtime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(attr.mtime_ns / 1e9)),
    }


def line(entry: dict) -> str:
    kind = {"dir": "d", "symlink": "l"}.get(entry["type"], "-")
    return (
        f"{kind}{entry['mode'][2:]:>4} {entry['nlink']:>3} {entry['uid']:>5} {entry['gid']:>5} "
        f"{entry['size']:>12} {entry['mtime']} {entry['name']}"
    )


async def act(client: ClusterClient, args) -> object:
    cmd = args.fs_command
    if cmd == "ls":
        attr = await client.resolve(args.path)
        if not stat.S_ISDIR(attr.mode):
            return [describe(args.path, attr)]
        rows, cookie = [], 0
        while True:
            page = await client.readdir(attr.ino, cookie, 1000)
            if not page:
                return rows
            rows.extend(describe(name.decode(errors="replace"), a) for name, a, _ in page)
            cookie = page[-1][2]
    if cmd == "stat":
        return describe(args.path, await client.resolve(args.path))
    if cmd == "mkdir":
        if args.parents:
            return describe(args.path, await client.mkdirs(args.path))
        parent, name = split(args.path)
        p = await client.resolve(parent)
        return describe(args.path, await client.mkdir(p.ino, name, 0o755, os.getuid(), os.getgid()))
    if cmd == "rm":
        parent, name = split(args.path)
        if args.recursive:
            await client.remove_tree(args.path)
            return None
        p = await client.resolve(parent)
        attr = await client.lookup(p.ino, name)
        await (client.rmdir if stat.S_ISDIR(attr.mode) else client.unlink)(p.ino, name)
        return None
    if cmd == "mv":
        (sp, sn), (dp, dn) = split(args.src), split(args.dst)
        await client.rename((await client.resolve(sp)).ino, sn, (await client.resolve(dp)).ino, dn)
        return None
    if cmd == "put":
        return await put(client, args.local, args.path)
    if cmd == "get":
        return await get(client, args.path, args.local)
    if cmd == "quota":
        attr = await client.resolve(args.path)
        if args.clear:
            q = await client.set_quota(attr.ino, None, None)
        elif args.max_bytes is not None or args.max_inodes is not None:
            q = await client.set_quota(attr.ino, args.max_bytes, args.max_inodes)
        else:
            q = await client.get_quota(attr.ino)
        return {
            "path": args.path,
            "quota_ino": q.ino,
            "max_bytes": q.max_bytes,
            "max_inodes": q.max_inodes,
            "used_bytes": q.used_bytes,
            "used_inodes": q.used_inodes,
        }
    if cmd == "df":
        return await client.statfs()
    raise ValueError(f"unknown action {cmd}")


async def put(client: ClusterClient, local: str, path: str) -> dict:
    parent, name = split(path)
    p = await client.resolve(parent)
    try:
        attr = await client.create(p.ino, name, 0o644, os.getuid(), os.getgid())
    except ClusterError as exc:
        if exc.errno != errno.EEXIST:
            raise
        attr = await client.lookup(p.ino, name)
        attr = await client.setattr(attr.ino, size=0)
    size = 0
    async with await trio.open_file(local, "rb") as f:
        while chunk := await f.read(CHUNK):
            await client.write(attr.ino, size, chunk)
            size += len(chunk)
    return describe(path, await client.commit(attr.ino, size))


async def get(client: ClusterClient, path: str, local: str) -> dict:
    attr = await client.resolve(path)
    out = trio.wrap_file(sys.stdout.buffer) if local == "-" else await trio.open_file(local, "wb")
    try:
        offset = 0
        while offset < attr.size:
            data = await client.read(attr.ino, offset, CHUNK)
            if not data:
                break
            await out.write(data)
            offset += len(data)
    finally:
        if local == "-":
            await out.flush()
        else:
            await out.aclose()
    return {"path": path, "bytes": offset}


def show(result, args) -> None:
    if result is None or (args.fs_command == "get" and args.local == "-"):
        return
    if args.json:
        print(json.dumps(result, indent=None if isinstance(result, list) else 2))
    elif args.fs_command == "ls":
        for entry in result:
            print(line(entry))
    elif args.fs_command in ("stat", "mkdir", "put"):
        print(line(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")


# errors whose standard text says it all (the master's message names inode numbers)
PLAIN = frozenset({errno.ENOENT, errno.EEXIST, errno.ENOTDIR, errno.EISDIR, errno.ENOTEMPTY})


def failure(exc: Exception, args) -> str:
    """One line: the path, the errno name and what it means; errors of the connection or of
    a local file as they are."""
    if not isinstance(exc, ClusterError) or isinstance(exc, ClusterUnavailable):
        return errors.describe(exc)
    name = errno.errorcode.get(exc.errno, "EIO")
    if args.fs_command == "quota" and exc.errno == errno.ENODATA:
        text = "no quota set on it or above it"
    else:
        text = os.strerror(exc.errno) if exc.errno in PLAIN else exc.strerror
    paths = [args.src, args.dst] if args.fs_command == "mv" else [getattr(args, "path", "/")]
    return f"{' -> '.join(paths)}: {name}: {text}"


def run(args) -> int:
    try:
        token = load_token(args.token_file)

        async def main():
            async with ClusterClient(args.master_addrs, token=token, timeout=args.timeout) as c:
                # captured: raised inside the client's nursery it would come out as a group
                return await outcome.acapture(act, c, args)

        result = trio.run(main).unwrap()
    except (ClusterError, OSError, ValueError) as exc:
        print(f"fusecsi fs {args.fs_command}: {failure(exc, args)}", file=sys.stderr)
        return 1
    show(result, args)
    return 0
