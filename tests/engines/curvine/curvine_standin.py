"""A stand-in Curvine master, for tests only.

It exists because no Curvine binary can be obtained here (Curvine ships no wheel or
Debian package, and building its Rust tree is out of reach of CI): it answers the master
metadata RPCs fusecsi sends, written from Curvine's protocol facts — the 22-byte frame
prefix, protobuf headers, error replies carrying an ErrorKind, NotLeaderMaster from a
standby — on an in-memory tree (`Tree`) or on a real directory (`DirTree`, which the
stand-in curvine-fuse passes through, so the walkthrough can run on the pair). It decodes frames with its own few lines of `struct`,
not with fusecsi's framing module, so a mistake there cannot hide behind itself. Several
stand-ins may share one tree (`Tree`) with one of them the leader.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import signal
import stat
import struct
import sys
from dataclasses import dataclass, field

import trio

from fusecsi.engines.curvine import common_pb2
from fusecsi.engines.curvine import master_pb2 as pb

PREFIX = struct.Struct(">iibbqi")
# RpcCode
MKDIR, DELETE, FILE_STATUS, LIST_STATUS, RENAME, FS_INFO, SET_ATTR = 2, 3, 7, 8, 10, 14, 15
# ErrorKind
NOT_LEADER, EXISTS, NOT_FOUND, DIR_NOT_EMPTY, NOT_A_DIR, IS_A_DIR, COMMON = (
    2,
    7,
    8,
    11,
    27,
    26,
    10000,
)
NO_REPLACE = 1


class Fail(Exception):
    def __init__(self, kind: int, message: str) -> None:
        super().__init__(message)
        self.kind, self.message = kind, message


@dataclass
class Inode:
    id: int
    is_dir: bool
    mode: int = 0o777
    x_attr: dict[str, bytes] = field(default_factory=dict)
    length: int = 0


@dataclass
class Tree:
    nodes: dict[str, Inode] = field(default_factory=lambda: {"/": Inode(1, True)})
    next_id: int = 2
    capacity: int = 100 << 30
    available: int = 60 << 30

    # storage: where the inodes live (here a dict; DirTree keeps them in a real directory)
    def lookup(self, path: str) -> Inode | None:
        return self.nodes.get(path)

    def children(self, path: str) -> list[str]:
        prefix = path.rstrip("/") + "/"
        return sorted(p for p in self.nodes if p.startswith(prefix) and "/" not in p[len(prefix) :])

    def add(self, path: str, is_dir: bool, mode: int = 0o777, x_attr=None, length=0) -> Inode:
        node = Inode(self.next_id, is_dir, mode, dict(x_attr or {}), length)
        self.next_id += 1
        self.nodes[path] = node
        return node

    def remove(self, path: str) -> int:
        """Remove `path` and everything below it; how many inodes went."""
        doomed = [p for p in self.nodes if p == path or p.startswith(path + "/")]
        for each in doomed:
            del self.nodes[each]
        return len(doomed)

    def move(self, src: str, dst: str) -> None:
        moved = {p: n for p, n in self.nodes.items() if p == src or p.startswith(src + "/")}
        for each in moved:
            del self.nodes[each]
        for each, inode in moved.items():
            self.nodes[dst + each[len(src) :]] = inode

    def update_xattrs(self, path: str, add: dict[str, bytes], remove: list[str]) -> None:
        node = self.get(path)
        node.x_attr.update(add)
        for name in remove:
            node.x_attr.pop(name, None)

    def counts(self) -> tuple[int, int]:
        """(directories, files)"""
        dirs = sum(1 for n in self.nodes.values() if n.is_dir)
        return dirs, len(self.nodes) - dirs

    def get(self, path: str) -> Inode:
        node = self.lookup(path)
        if node is None:
            raise Fail(NOT_FOUND, f"File {path} not exists")
        return node

    def status(self, path: str) -> common_pb2.FileStatusProto:
        node = self.get(path)
        return common_pb2.FileStatusProto(
            id=node.id,
            path=path,
            name=posixpath.basename(path),
            is_dir=node.is_dir,
            mtime=0,
            atime=0,
            children_num=len(self.children(path)) if node.is_dir else 0,
            is_complete=True,
            len=node.length,
            replicas=1,
            block_size=64 << 20,
            file_type=common_pb2.FILE_TYPE_PROTO_DIR
            if node.is_dir
            else common_pb2.FILE_TYPE_PROTO_FILE,
            x_attr=node.x_attr,
            storage_policy=common_pb2.StoragePolicyProto(
                storage_type=common_pb2.STORAGE_TYPE_PROTO_DISK,
                ttl_ms=0,
                ttl_action=common_pb2.TTL_ACTION_PROTO_NONE,
                ufs_mtime=0,
                state=common_pb2.STORAGE_STATE_PROTO_CV,
            ),
            owner="",
            group="",
            mode=node.mode,
            nlink=2 if node.is_dir else 1,
        )

    # the master's semantics, as far as fusecsi relies on them
    def mkdir(self, request: pb.MkdirRequest) -> pb.MkdirResponse:
        path, opts = request.path, request.opts
        if path == "/":
            raise Fail(COMMON, "Not allowed to create existing root path: /")
        existing = self.lookup(path)
        if existing is not None:
            if opts.create_parent and existing.is_dir:
                return pb.MkdirResponse(flag=True, status=self.status(path))
            raise Fail(EXISTS, f"{path} already exists")
        parent = posixpath.dirname(path)
        missing = []
        while self.lookup(parent) is None:
            missing.append(parent)
            parent = posixpath.dirname(parent)
        if not self.get(parent).is_dir:
            raise Fail(COMMON, f"Parent path is not a directory:: {parent}")
        if missing and not opts.create_parent:
            raise Fail(COMMON, f"Parent directory doesn't exist: {posixpath.dirname(path)}")
        for each in reversed(missing):
            self.add(each, True, opts.mode)  # parents get no xattrs
        self.add(path, True, opts.mode, dict(opts.x_attr))
        return pb.MkdirResponse(flag=True, status=self.status(path))

    def delete(self, request: pb.DeleteRequest) -> pb.DeleteResponse:
        path = request.path
        if path == "/":
            raise Fail(COMMON, "The root is not allowed to be deleted")
        node = self.get(path)
        if node.is_dir and self.children(path) and not request.recursive:
            raise Fail(DIR_NOT_EMPTY, f"{path} is not empty")
        inodes = self.remove(path)
        return pb.DeleteResponse(res=common_pb2.FreeResultProto(inodes=inodes, bytes=0))

    def rename(self, request: pb.RenameRequest) -> pb.RenameResponse:
        src, dst = request.src, request.dst
        node = self.get(src)
        if src == dst:
            return pb.RenameResponse(result=False)
        if dst.startswith(src + "/"):
            raise Fail(28, f"cannot rename {src} to {dst}: destination is under source")
        target = self.lookup(dst)
        if target is not None:
            if request.flags & NO_REPLACE:
                raise Fail(EXISTS, f"{dst} already exists")
            if not node.is_dir and target.is_dir:
                raise Fail(IS_A_DIR, dst)
            if node.is_dir and not target.is_dir:
                raise Fail(NOT_A_DIR, dst)
            if target.is_dir and self.children(dst):
                raise Fail(DIR_NOT_EMPTY, dst)
            self.remove(dst)
        if self.lookup(posixpath.dirname(dst)) is None:
            raise Fail(COMMON, f"Parent {posixpath.dirname(dst)} does not exist")
        self.move(src, dst)
        return pb.RenameResponse(result=True)

    def set_attr(self, request: pb.SetAttrRequest) -> pb.SetAttrResponse:
        opts = request.opts
        self.update_xattrs(request.path, dict(opts.add_x_attr), list(opts.remove_x_attr))
        return pb.SetAttrResponse(status=self.status(request.path))

    def list_status(self, request: pb.ListStatusRequest) -> pb.ListStatusResponse:
        node = self.get(request.path)
        paths = self.children(request.path) if node.is_dir else [request.path]
        return pb.ListStatusResponse(statuses=[self.status(p) for p in paths])

    def info(self, active: str) -> pb.GetFilesystemInfoResponse:
        dirs, files = self.counts()
        return pb.GetFilesystemInfoResponse(
            active_master=active,
            inode_dir_num=dirs,
            inode_file_num=files,
            block_num=0,
            capacity=self.capacity,
            available=self.available,
            fs_used=self.capacity - self.available,
            non_fs_used=0,
            reserved_bytes=0,
        )


HANDLERS = {
    MKDIR: (pb.MkdirRequest, Tree.mkdir),
    DELETE: (pb.DeleteRequest, Tree.delete),
    FILE_STATUS: (
        pb.GetFileStatusRequest,
        lambda t, r: pb.GetFileStatusResponse(status=t.status(r.path)),
    ),
    LIST_STATUS: (pb.ListStatusRequest, Tree.list_status),
    RENAME: (pb.RenameRequest, Tree.rename),
    SET_ATTR: (pb.SetAttrRequest, Tree.set_attr),
}


class StandinMaster:
    """One master process's worth: `await nursery.start(master.serve)` binds loopback."""

    def __init__(self, tree: Tree | None = None, *, leader: bool = True) -> None:
        self.tree = tree if tree is not None else Tree()
        self.leader = leader
        self.silent = False  # accept and read, never answer (a hung master)
        self.heartbeat_first = False  # send a keepalive frame before each reply
        self.requests: list[tuple[int, int]] = []  # (code, req_id) as received
        self.address = ""
        self._streams: set[trio.SocketStream] = set()

    async def drop_connections(self) -> None:
        """Close every client connection, as a restarting master would."""
        for stream in list(self._streams):
            await stream.aclose()

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        self.address = f"127.0.0.1:{port}"
        await trio.serve_listeners(self._connection, listeners, task_status=task_status)

    async def _connection(self, stream: trio.SocketStream) -> None:
        buffer = bytearray()
        self._streams.add(stream)
        try:
            await self._serve_connection(stream, buffer)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self._streams.discard(stream)
            await trio.aclose_forcefully(stream)

    async def _serve_connection(self, stream: trio.SocketStream, buffer: bytearray) -> None:
        while True:
            while (
                len(buffer) < PREFIX.size or len(buffer) < 4 + struct.unpack_from(">i", buffer)[0]
            ):
                chunk = await stream.receive_some()
                if not chunk:
                    return
                buffer += chunk
            total, header_len, code, status, req_id, seq_id = PREFIX.unpack_from(buffer)
            header = bytes(buffer[PREFIX.size : PREFIX.size + header_len])
            del buffer[: 4 + total]
            assert status == -15, f"request status byte {status} (Rpc | Undefined << 4 = 0xF1)"
            assert seq_id == -1, seq_id
            self.requests.append((code, req_id))
            if self.silent:
                continue
            if self.heartbeat_first:
                await stream.send_all(PREFIX.pack(18, 0, 1, -16, -1, -1))  # Heartbeat
            reply_header, error = self._handle(code, header)
            if error is None:
                body, data, status = reply_header, b"", 0x01  # Rpc | Success << 4
            else:
                kind, message = error
                raw = message.encode()
                body, data = (
                    b"",
                    struct.pack(">iI", kind, len(raw)) + raw + struct.pack(">I", 0),
                )
                status = 0x11  # Rpc | Error << 4
            prefix = PREFIX.pack(
                18 + len(body) + len(data), len(body), code, status, req_id, seq_id
            )
            await stream.send_all(prefix + body + data)

    def _handle(self, code: int, header: bytes) -> tuple[bytes, tuple[int, str] | None]:
        if not self.leader:
            return b"", (NOT_LEADER, f"Master is not the leader, request {code}")
        try:
            if code == FS_INFO:
                pb.GetFilesystemInfoRequest.FromString(header)
                return self.tree.info(self.address).SerializeToString(), None
            if code not in HANDLERS:
                return b"", (COMMON, "Unsupported operation")
            request_type, handler = HANDLERS[code]
            request = request_type.FromString(header)  # checks every required field is set
            return handler(self.tree, request).SerializeToString(), None
        except Fail as fail:
            return b"", (fail.kind, fail.message)
        except OSError as exc:  # DirTree: what the checks above did not foresee
            return b"", (COMMON, str(exc))


class DirTree(Tree):
    """The same master keeping its namespace in a real local directory, so that a stand-in
    curvine-fuse passing that directory through shows the same files (the walkthrough needs
    what the controller creates and what pods write to be one tree, as on real Curvine).
    Inode ids are the real inode numbers; xattrs are the real directory's (user.* and
    trusted.*, names as the master got them); the master's semantics and error kinds are
    Tree's, unchanged."""

    def __init__(self, root: str | os.PathLike) -> None:
        super().__init__(nodes={})
        self.root = os.fspath(root)

    def real(self, path: str) -> str:
        parts = [] if path == "/" else path.split("/")[1:]
        if not path.startswith("/") or any(part in ("", ".", "..") for part in parts):
            raise Fail(COMMON, f"Invalid path {path}")  # nothing escapes the root
        return os.path.join(self.root, *parts)

    def lookup(self, path: str) -> Inode | None:
        real = self.real(path)
        try:
            st = os.lstat(real)
            names = os.listxattr(real, follow_symlinks=False)
            x_attr = {n: os.getxattr(real, n, follow_symlinks=False) for n in names}
        except (FileNotFoundError, NotADirectoryError):
            return None
        is_dir = stat.S_ISDIR(st.st_mode)
        return Inode(st.st_ino, is_dir, st.st_mode & 0o7777, x_attr, 0 if is_dir else st.st_size)

    def children(self, path: str) -> list[str]:
        return sorted(posixpath.join(path, name) for name in os.listdir(self.real(path)))

    def add(self, path: str, is_dir: bool, mode: int = 0o777, x_attr=None, length=0) -> Inode:
        real = self.real(path)
        if is_dir:
            os.mkdir(real)
        else:
            with open(real, "xb") as f:
                f.truncate(length)
        os.chmod(real, mode)  # as given, not as the umask leaves it
        for name, value in (x_attr or {}).items():
            os.setxattr(real, name, value, follow_symlinks=False)
        return self.get(path)

    def remove(self, path: str) -> int:
        real = self.real(path)
        if not os.path.isdir(real) or os.path.islink(real):
            os.unlink(real)
            return 1
        inodes = 1 + sum(len(dirs) + len(files) for _, dirs, files in os.walk(real))
        shutil.rmtree(real)
        return inodes

    def move(self, src: str, dst: str) -> None:
        os.rename(self.real(src), self.real(dst))

    def update_xattrs(self, path: str, add: dict[str, bytes], remove: list[str]) -> None:
        self.get(path)  # NOT_FOUND as in Tree
        real = self.real(path)
        for name, value in add.items():
            os.setxattr(real, name, value, follow_symlinks=False)
        for name in remove:
            with contextlib.suppress(OSError):  # ENODATA: already absent, as in Tree
                os.removexattr(real, name, follow_symlinks=False)

    def counts(self) -> tuple[int, int]:
        dirs, files = 1, 0
        for _, subdirs, names in os.walk(self.root):
            dirs, files = dirs + len(subdirs), files + len(names)
        return dirs, files


async def _serve_forever(root: str) -> None:
    master = StandinMaster(DirTree(root))
    async with trio.open_nursery() as nursery:
        await nursery.start(master.serve)
        print(master.address, flush=True)  # the one line the starter waits for
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                nursery.cancel_scope.cancel()
                return


if __name__ == "__main__":
    # `curvine_standin.py ROOT`: a master process on loopback with its namespace in ROOT
    trio.run(_serve_forever, sys.argv[1])
