"""A stand-in Curvine master, for tests only.

It exists because no Curvine binary can be obtained here (Curvine ships no wheel or
Debian package, and building its Rust tree is out of reach of CI): it answers the master
metadata RPCs fusecsi sends, written from Curvine's protocol facts — the 22-byte frame
prefix, protobuf headers, error replies carrying an ErrorKind, NotLeaderMaster from a
standby — on an in-memory tree. It decodes frames with its own few lines of `struct`,
not with fusecsi's framing module, so a mistake there cannot hide behind itself. Several
stand-ins may share one tree (`Tree`) with one of them the leader.
"""

from __future__ import annotations

import posixpath
import struct
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

    def get(self, path: str) -> Inode:
        node = self.nodes.get(path)
        if node is None:
            raise Fail(NOT_FOUND, f"File {path} not exists")
        return node

    def children(self, path: str) -> list[str]:
        prefix = path.rstrip("/") + "/"
        return sorted(p for p in self.nodes if p.startswith(prefix) and "/" not in p[len(prefix) :])

    def add(self, path: str, is_dir: bool, mode: int = 0o777, x_attr=None, length=0) -> Inode:
        node = Inode(self.next_id, is_dir, mode, dict(x_attr or {}), length)
        self.next_id += 1
        self.nodes[path] = node
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
        if path in self.nodes:
            if opts.create_parent and self.nodes[path].is_dir:
                return pb.MkdirResponse(flag=True, status=self.status(path))
            raise Fail(EXISTS, f"{path} already exists")
        parent = posixpath.dirname(path)
        missing = []
        while parent not in self.nodes:
            missing.append(parent)
            parent = posixpath.dirname(parent)
        if not self.nodes[parent].is_dir:
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
        doomed = [p for p in self.nodes if p == path or p.startswith(path + "/")]
        for each in doomed:
            del self.nodes[each]
        return pb.DeleteResponse(res=common_pb2.FreeResultProto(inodes=len(doomed), bytes=0))

    def rename(self, request: pb.RenameRequest) -> pb.RenameResponse:
        src, dst = request.src, request.dst
        node = self.get(src)
        if src == dst:
            return pb.RenameResponse(result=False)
        if dst.startswith(src + "/"):
            raise Fail(28, f"cannot rename {src} to {dst}: destination is under source")
        if dst in self.nodes:
            target = self.nodes[dst]
            if request.flags & NO_REPLACE:
                raise Fail(EXISTS, f"{dst} already exists")
            if not node.is_dir and target.is_dir:
                raise Fail(IS_A_DIR, dst)
            if node.is_dir and not target.is_dir:
                raise Fail(NOT_A_DIR, dst)
            if target.is_dir and self.children(dst):
                raise Fail(DIR_NOT_EMPTY, dst)
            del self.nodes[dst]
        if posixpath.dirname(dst) not in self.nodes:
            raise Fail(COMMON, f"Parent {posixpath.dirname(dst)} does not exist")
        moved = {p: n for p, n in self.nodes.items() if p == src or p.startswith(src + "/")}
        for each in moved:
            del self.nodes[each]
        for each, inode in moved.items():
            self.nodes[dst + each[len(src) :]] = inode
        return pb.RenameResponse(result=True)

    def set_attr(self, request: pb.SetAttrRequest) -> pb.SetAttrResponse:
        node = self.get(request.path)
        node.x_attr.update(request.opts.add_x_attr)
        for name in request.opts.remove_x_attr:
            node.x_attr.pop(name, None)
        return pb.SetAttrResponse(status=self.status(request.path))

    def list_status(self, request: pb.ListStatusRequest) -> pb.ListStatusResponse:
        node = self.get(request.path)
        paths = self.children(request.path) if node.is_dir else [request.path]
        return pb.ListStatusResponse(statuses=[self.status(p) for p in paths])

    def info(self, active: str) -> pb.GetFilesystemInfoResponse:
        dirs = sum(1 for n in self.nodes.values() if n.is_dir)
        return pb.GetFilesystemInfoResponse(
            active_master=active,
            inode_dir_num=dirs,
            inode_file_num=len(self.nodes) - dirs,
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
