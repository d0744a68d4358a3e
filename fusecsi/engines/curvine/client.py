"""A client for a Curvine cluster's master metadata RPCs (trio, pure Python).

One master is the leader; the others answer every RPC with the error kind NotLeaderMaster
and name no leader, so the client remembers which master answered last and otherwise
tries each listed master in turn, in rounds, until its deadline (as Curvine's own client
does). Curvine has no authentication. Errors are OSError with an errno; `Unreachable`
when no master answered as leader before the deadline.
"""

from __future__ import annotations

import errno
import random
import re
from collections.abc import Mapping, Sequence

import trio
from google.protobuf.message import DecodeError, EncodeError
from google.protobuf.message import Message as ProtoMessage

from fusecsi.csi.volumes import normalize_master_addrs
from fusecsi.engines.base import Unreachable
from fusecsi.engines.curvine import common_pb2, framing
from fusecsi.engines.curvine import master_pb2 as pb

DEFAULT_MODE = 0o777  # Curvine's default directory mode
RENAME_NOREPLACE = 1  # RenameFlags::NO_REPLACE
_BACKOFF_FIRST, _BACKOFF_MAX = 0.05, 1.0
# what makes one attempt at one master fail (the next master is tried)
_CONNECTION_FAILURES = (
    OSError,
    EOFError,
    framing.FrameError,
    trio.TooSlowError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
)

ERRNO_OF_KIND = {
    framing.TIMEOUT: errno.ETIMEDOUT,
    framing.FILE_ALREADY_EXISTS: errno.EEXIST,
    framing.FILE_NOT_FOUND: errno.ENOENT,
    framing.PARENT_NOT_DIR: errno.ENOTDIR,
    framing.DIR_NOT_EMPTY: errno.ENOTEMPTY,
    framing.INVALID_PATH: errno.EINVAL,
    framing.DISK_OUT_OF_SPACE: errno.ENOSPC,
    framing.UNSUPPORTED: errno.EOPNOTSUPP,
    framing.IS_A_DIRECTORY: errno.EISDIR,
    framing.NOT_A_DIRECTORY: errno.ENOTDIR,
    framing.INVALID_ARGUMENT: errno.EINVAL,
    framing.READ_ONLY: errno.EROFS,
    framing.RAFT: errno.EAGAIN,
}


def one_line(text: str, limit: int = 300) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def remote_error(addr: str, error: framing.RemoteError) -> OSError:
    name = framing.KIND_NAMES.get(error.kind, f"kind {error.kind}")
    code = ERRNO_OF_KIND.get(error.kind, errno.EIO)
    return OSError(code, f"curvine master {addr}: {name}: {one_line(error.message)}")


def split_addrs(addrs: str | Sequence[str]) -> list[tuple[str, int]]:
    text = addrs if isinstance(addrs, str) else ",".join(addrs)
    result = []
    for item in normalize_master_addrs(text).split(","):
        host, _, port = item.rpartition(":")
        result.append((host.strip("[]"), int(port)))
    return result


class _Connection:
    """One TCP connection to one master (the client sends one RPC at a time on it)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream

    async def exchange(self, request: framing.Frame) -> framing.Frame:
        await self.stream.send_all(request.encode())
        while True:
            reply = await framing.read_frame(self.stream)
            if reply.request == framing.REQ_HEARTBEAT:
                continue  # a master's keepalive, not our answer
            if reply.req_id != request.req_id or reply.code != request.code:
                raise framing.FrameError(
                    f"reply to request {reply.req_id} (code {reply.code}) "
                    f"while waiting for {request.req_id} (code {request.code})"
                )
            if reply.response not in (framing.REP_SUCCESS, framing.REP_ERROR):
                raise framing.FrameError(f"reply with response status {reply.response}")
            return reply


class MasterClient:
    """`async with MasterClient("m1:8995,m2:8995", timeout=10) as client: ...`

    `timeout` bounds each call as a whole (all masters, all rounds); one master gets at
    most its share of it per attempt, so a master that accepts and never answers cannot
    use up the time another one would answer in.
    """

    def __init__(self, addrs: str | Sequence[str], *, timeout: float = 10.0) -> None:
        self.addrs = split_addrs(addrs)
        self.timeout = timeout
        self.attempt_timeout = max(timeout / len(self.addrs), min(timeout, 1.0))
        self._leader: int | None = None
        self._connections: dict[int, _Connection] = {}
        # one RPC at a time per master: concurrent calls queue (metadata RPCs are short)
        self._locks = [trio.Lock() for _ in self.addrs]

    def label(self, index: int) -> str:
        host, port = self.addrs[index]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def __aenter__(self) -> MasterClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        connections, self._connections = list(self._connections.values()), {}
        with trio.CancelScope(shield=True):
            for connection in connections:
                await trio.aclose_forcefully(connection.stream)

    async def _drop(self, index: int) -> None:
        connection = self._connections.pop(index, None)
        if connection is not None:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(connection.stream)

    async def _attempt(self, index: int, request: framing.Frame) -> framing.Frame:
        async with self._locks[index]:
            connection = self._connections.get(index)
            if connection is None:
                host, port = self.addrs[index]
                connection = _Connection(await trio.open_tcp_stream(host, port))
                self._connections[index] = connection
            try:
                return await connection.exchange(request)
            except BaseException:
                # a half-sent request or half-read reply leaves the stream unusable
                await self._drop(index)
                raise

    def _order(self) -> list[int]:
        order = list(range(len(self.addrs)))
        if self._leader is not None:
            order.remove(self._leader)
            order.insert(0, self._leader)
        return order

    async def call(self, code: int, request: ProtoMessage, reply_type: type[ProtoMessage]):
        """Send one RPC to the leader; its decoded reply, or OSError."""
        try:
            header = request.SerializeToString()
        except EncodeError as exc:  # a required field left unset: our bug, said plainly
            raise OSError(errno.EINVAL, f"curvine request incomplete: {exc}") from None
        frame = framing.request_frame(code, random.getrandbits(63), header)
        deadline = trio.current_time() + self.timeout
        failures: dict[int, BaseException | str] = {}
        backoff = _BACKOFF_FIRST
        while True:
            for index in self._order():
                remaining = deadline - trio.current_time()
                if remaining <= 0:
                    break
                try:
                    with trio.fail_after(min(remaining, self.attempt_timeout)):
                        reply = await self._attempt(index, frame)
                except _CONNECTION_FAILURES as exc:
                    failures[index] = exc
                    if self._leader == index:
                        self._leader = None
                    continue
                if reply.response == framing.REP_SUCCESS:
                    self._leader = index
                    return self._decode(index, reply, reply_type)
                error = framing.decode_error(reply.data)
                if error.kind == framing.NOT_LEADER_MASTER:
                    failures[index] = "not the leader"
                    if self._leader == index:
                        self._leader = None
                    continue
                self._leader = index
                raise remote_error(self.label(index), error)
            remaining = deadline - trio.current_time()
            if remaining <= 0:
                raise self._unreachable(failures)
            await trio.sleep(min(backoff, remaining))
            backoff = min(backoff * 2, _BACKOFF_MAX)

    def _decode(self, index: int, reply: framing.Frame, reply_type: type[ProtoMessage]):
        message = reply_type()
        try:
            # Merge, not Parse: a master that leaves out a field we declare required is
            # still understood (prost does not enforce proto2 `required`)
            message.MergeFromString(reply.header)
        except DecodeError as exc:
            raise OSError(
                errno.EBADMSG, f"curvine master {self.label(index)}: undecodable reply: {exc}"
            ) from None
        return message

    def _unreachable(self, failures: Mapping[int, BaseException | str]) -> Unreachable:
        def why(failure: BaseException | str) -> str:
            if isinstance(failure, str):
                return failure
            if _refused(failure):
                return "connection refused"
            if isinstance(failure, trio.TooSlowError):
                return "no answer in time"
            if isinstance(failure, OSError) and failure.strerror:
                return one_line(failure.strerror, 120)
            return one_line(str(failure) or type(failure).__name__, 120)

        listed = "; ".join(
            f"{self.label(i)}: {why(failures[i])}"
            if i in failures
            else f"{self.label(i)}: not tried"
            for i in range(len(self.addrs))
        )
        refused = bool(failures) and all(
            not isinstance(f, str) and _refused(f) for f in failures.values()
        )
        code = errno.ECONNREFUSED if refused else errno.ETIMEDOUT
        return Unreachable(
            f"no Curvine master answered as leader within {self.timeout:g}s ({listed})", code
        )

    # --- the RPCs ---

    async def mkdir(
        self,
        path: str,
        *,
        create_parent: bool,
        mode: int = DEFAULT_MODE,
        x_attr: Mapping[str, bytes] | None = None,
    ) -> common_pb2.FileStatusProto:
        opts = pb.MkdirOptsProto(
            create_parent=create_parent,
            mode=mode & 0o7777,
            x_attr=dict(x_attr or {}),
            storage_policy=default_storage_policy(),
            owner="",
            group="",
        )
        reply = await self.call(
            framing.MKDIR, pb.MkdirRequest(path=path, opts=opts), pb.MkdirResponse
        )
        return reply.status

    async def delete(self, path: str, *, recursive: bool) -> None:
        request = pb.DeleteRequest(path=path, recursive=recursive)
        await self.call(framing.DELETE, request, pb.DeleteResponse)

    async def file_status(self, path: str) -> common_pb2.FileStatusProto:
        request = pb.GetFileStatusRequest(path=path)
        reply = await self.call(framing.FILE_STATUS, request, pb.GetFileStatusResponse)
        return reply.status

    async def list_status(self, path: str) -> list[common_pb2.FileStatusProto]:
        request = pb.ListStatusRequest(path=path, need_location=False)
        reply = await self.call(framing.LIST_STATUS, request, pb.ListStatusResponse)
        return list(reply.statuses)

    async def rename(self, src: str, dst: str, *, flags: int = 0) -> bool:
        request = pb.RenameRequest(src=src, dst=dst, flags=flags)
        reply = await self.call(framing.RENAME, request, pb.RenameResponse)
        return reply.result

    async def set_xattrs(
        self,
        path: str,
        *,
        add: Mapping[str, bytes] | None = None,
        remove: Sequence[str] = (),
    ) -> common_pb2.FileStatusProto:
        opts = pb.SetAttrOptsProto(
            recursive=False, add_x_attr=dict(add or {}), remove_x_attr=list(remove)
        )
        request = pb.SetAttrRequest(path=path, opts=opts)
        reply = await self.call(framing.SET_ATTR, request, pb.SetAttrResponse)
        return reply.status

    async def filesystem_info(self) -> pb.GetFilesystemInfoResponse:
        request = pb.GetFilesystemInfoRequest()
        return await self.call(framing.GET_FILESYSTEM_INFO, request, pb.GetFilesystemInfoResponse)


def _refused(exc: BaseException) -> bool:
    """A refused connection, also as trio's "all attempts to connect failed" OSError."""
    if isinstance(exc, ConnectionRefusedError):
        return True
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup):
        leaves = cause.exceptions
        return bool(leaves) and all(_refused(leaf) for leaf in leaves)
    return False


def default_storage_policy() -> common_pb2.StoragePolicyProto:
    """Curvine's StoragePolicy::default(), every required field set."""
    return common_pb2.StoragePolicyProto(
        storage_type=common_pb2.STORAGE_TYPE_PROTO_DISK,
        ttl_ms=0,
        ttl_action=common_pb2.TTL_ACTION_PROTO_NONE,
        ufs_mtime=0,
        state=common_pb2.STORAGE_STATE_PROTO_CV,
    )
