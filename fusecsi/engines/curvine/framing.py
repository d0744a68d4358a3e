"""Curvine's RPC frame: a 22-byte big-endian prefix, a protobuf header, raw data.

Prefix (facts from Curvine's orpc message code):
    total_len  i32  bytes after this field: 18 + header_len + data_len
    header_len i32
    code       i8   the RPC (RpcCode: Mkdir 2, Delete 3, ...)
    status     i8   request status in the low nibble, response status in the high one
    req_id     i64  echoed in the reply (the master's retry cache is keyed on it)
    seq_id     i32  -1 for a one-shot RPC
An error reply has response status Error and no header; its data is the error: i32 kind,
u32 message length, message (UTF-8), u32 length of optional bincode data, that data.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import trio

PREFIX = struct.Struct(">iibbqi")
PREFIX_SIZE = PREFIX.size  # 22
HEAD_SIZE = PREFIX_SIZE - 4  # what total_len counts besides header and data
MAX_DATA = 16 * 1024 * 1024  # Curvine's limit on one frame's data
MAX_HEADER = 16 * 1024 * 1024  # ours: a metadata reply (a large ListStatus) stays below it
INIT_SEQ_ID = -1

# request status (low nibble)
REQ_UNDEFINED, REQ_HEARTBEAT, REQ_RPC = -1, 0, 1
# response status (high nibble)
REP_UNDEFINED, REP_SUCCESS, REP_ERROR = -1, 0, 1


class FrameError(ValueError):
    """Bytes that are not a Curvine frame (the connection cannot be trusted any more)."""


def encode_status(request: int, response: int) -> int:
    """The status byte as a signed i8 (Curvine: request | response << 4)."""
    value = (request & 0x0F) | ((response & 0x0F) << 4)
    return value - 256 if value > 127 else value


def decode_status(value: int) -> tuple[int, int]:
    """(request, response) from the signed status byte (the high nibble shifts in sign)."""
    request = value & 0x0F
    response = value >> 4  # arithmetic: 0xF? -> -1 (undefined)
    return (request if request != 0x0F else -1), response


@dataclass(frozen=True)
class Frame:
    code: int
    request: int
    response: int
    req_id: int
    seq_id: int = INIT_SEQ_ID
    header: bytes = b""
    data: bytes = b""

    def encode(self) -> bytes:
        prefix = PREFIX.pack(
            HEAD_SIZE + len(self.header) + len(self.data),
            len(self.header),
            self.code,
            encode_status(self.request, self.response),
            self.req_id,
            self.seq_id,
        )
        return prefix + self.header + self.data


def request_frame(code: int, req_id: int, header: bytes) -> Frame:
    return Frame(code, REQ_RPC, REP_UNDEFINED, req_id, INIT_SEQ_ID, header)


def parse_prefix(prefix: bytes) -> tuple[int, int, int, int, int, int]:
    """(header_len, data_len, code, status, req_id, seq_id); FrameError on a bad prefix."""
    total, header_len, code, status, req_id, seq_id = PREFIX.unpack(prefix)
    data_len = total - header_len - HEAD_SIZE
    if header_len < 0 or data_len < 0:
        raise FrameError(f"bad frame lengths (total {total}, header {header_len})")
    if header_len > MAX_HEADER or data_len > MAX_DATA:
        raise FrameError(f"frame too large (header {header_len}, data {data_len} bytes)")
    return header_len, data_len, code, status, req_id, seq_id


def decode(buffer: bytes) -> Frame:
    """One whole frame from bytes (FrameError when it is not exactly one frame)."""
    if len(buffer) < PREFIX_SIZE:
        raise FrameError(f"short frame ({len(buffer)} bytes)")
    header_len, data_len, code, status, req_id, seq_id = parse_prefix(buffer[:PREFIX_SIZE])
    if len(buffer) != PREFIX_SIZE + header_len + data_len:
        raise FrameError(f"frame length {len(buffer)} does not match its prefix")
    request, response = decode_status(status)
    body = buffer[PREFIX_SIZE:]
    return Frame(code, request, response, req_id, seq_id, body[:header_len], body[header_len:])


async def _read_exactly(stream: trio.abc.ReceiveStream, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = await stream.receive_some(min(size - len(chunks), 1 << 20))
        if not chunk:
            raise EOFError(f"connection closed after {len(chunks)} of {size} bytes")
        chunks += chunk
    return bytes(chunks)


async def read_frame(stream: trio.abc.ReceiveStream) -> Frame:
    """The next frame; EOFError when the peer closed, FrameError on garbage."""
    prefix = await _read_exactly(stream, PREFIX_SIZE)
    header_len, data_len, code, status, req_id, seq_id = parse_prefix(prefix)
    body = await _read_exactly(stream, header_len + data_len) if header_len + data_len else b""
    request, response = decode_status(status)
    return Frame(code, request, response, req_id, seq_id, body[:header_len], body[header_len:])


@dataclass(frozen=True)
class RemoteError:
    kind: int
    message: str


def encode_error(kind: int, message: str) -> bytes:
    raw = message.encode()
    return struct.pack(">iI", kind, len(raw)) + raw + struct.pack(">I", 0)


def decode_error(data: bytes) -> RemoteError:
    """An error reply's data; a payload too short for a kind reads as kind Common."""
    if len(data) < 8:
        return RemoteError(COMMON, data.decode(errors="replace"))
    kind, length = struct.unpack_from(">iI", data)
    message = data[8 : 8 + length].decode(errors="replace")
    return RemoteError(kind, message)


# ErrorKind (Curvine's curvine-error fs_error.rs); the ones the client acts on by name
NOT_LEADER_MASTER = 2
RAFT = 3
TIMEOUT = 4
FILE_ALREADY_EXISTS = 7
FILE_NOT_FOUND = 8
PARENT_NOT_DIR = 10
DIR_NOT_EMPTY = 11
INVALID_PATH = 16
DISK_OUT_OF_SPACE = 17
UNSUPPORTED = 19
IS_A_DIRECTORY = 26
NOT_A_DIRECTORY = 27
INVALID_ARGUMENT = 28
READ_ONLY = 30
COMMON = 10000

KIND_NAMES = {
    1: "IO",
    NOT_LEADER_MASTER: "NotLeaderMaster",
    RAFT: "Raft",
    TIMEOUT: "Timeout",
    5: "PBDecode",
    6: "PBEncode",
    FILE_ALREADY_EXISTS: "FileAlreadyExists",
    FILE_NOT_FOUND: "FileNotFound",
    9: "InvalidFileSize",
    PARENT_NOT_DIR: "ParentNotDir",
    DIR_NOT_EMPTY: "DirNotEmpty",
    INVALID_PATH: "InvalidPath",
    DISK_OUT_OF_SPACE: "DiskOutOfSpace",
    UNSUPPORTED: "Unsupported",
    IS_A_DIRECTORY: "IsADirectory",
    NOT_A_DIRECTORY: "NotADirectory",
    INVALID_ARGUMENT: "InvalidArgument",
    READ_ONLY: "ReadOnly",
    COMMON: "Common",
}

# RpcCode (Curvine's curvine-fs-api rpc_code.rs): the master RPCs fusecsi sends
MKDIR = 2
DELETE = 3
FILE_STATUS = 7
LIST_STATUS = 8
RENAME = 10
GET_FILESYSTEM_INFO = 14
SET_ATTR = 15
