"""Curvine's frame layout: prefix bytes, status nibbles, error payloads, bounds."""

from __future__ import annotations

import struct

import pytest
import trio
import trio.testing

from fusecsi.engines.curvine import framing


def test_request_prefix_bytes_match_the_layout():
    frame = framing.request_frame(framing.MKDIR, req_id=0x0102030405060708, header=b"HDR")
    raw = frame.encode()
    # total_len = 18 + header + data; header_len; code; status 0xF1 (Rpc=1 | Undefined=-1 << 4)
    assert raw[:22] == (
        b"\x00\x00\x00\x15\x00\x00\x00\x03\x02\xf1\x01\x02\x03\x04\x05\x06\x07\x08\xff\xff\xff\xff"
    )
    assert raw[22:] == b"HDR"
    assert framing.PREFIX_SIZE == 22


@pytest.mark.parametrize(
    ("request_status", "response_status", "byte"),
    [
        (framing.REQ_RPC, framing.REP_UNDEFINED, 0xF1),
        (framing.REQ_RPC, framing.REP_SUCCESS, 0x01),
        (framing.REQ_RPC, framing.REP_ERROR, 0x11),
        (framing.REQ_HEARTBEAT, framing.REP_UNDEFINED, 0xF0),
        (framing.REQ_UNDEFINED, framing.REP_UNDEFINED, 0xFF),
    ],
)
def test_status_nibbles(request_status, response_status, byte):
    signed = byte - 256 if byte > 127 else byte
    assert framing.encode_status(request_status, response_status) == signed
    assert framing.decode_status(signed) == (request_status, response_status)


@pytest.mark.parametrize(
    "frame",
    [
        framing.Frame(7, framing.REQ_RPC, framing.REP_SUCCESS, -1, -1, b"", b""),
        framing.Frame(8, framing.REQ_RPC, framing.REP_ERROR, 2**63 - 1, 5, b"", b"e" * 1000),
        framing.Frame(14, framing.REQ_RPC, framing.REP_UNDEFINED, -(2**63), -2, b"h" * 70000, b"d"),
    ],
)
def test_round_trip(frame):
    assert framing.decode(frame.encode()) == frame


async def test_round_trip_through_a_stream_in_pieces():
    frames = [
        framing.request_frame(framing.LIST_STATUS, n, bytes(range(256)) * n) for n in range(5)
    ]
    wire = b"".join(f.encode() for f in frames)
    send, receive = trio.testing.memory_stream_pair()
    for start in range(0, len(wire), 7):  # the reader must reassemble odd pieces
        await send.send_all(wire[start : start + 7])
    await send.aclose()
    assert [await framing.read_frame(receive) for _ in frames] == frames
    with pytest.raises(EOFError):
        await framing.read_frame(receive)


def test_error_payload():
    data = framing.encode_error(framing.FILE_NOT_FOUND, "File /a not exists")
    # kind i32, message length u32, message, bincode data length u32 (0: none)
    assert data == b"\x00\x00\x00\x08\x00\x00\x00\x12File /a not exists" + bytes(4)
    error = framing.decode_error(data)
    assert (error.kind, error.message) == (8, "File /a not exists")
    # trailing bincode data (Curvine may attach some) is ignored
    assert framing.decode_error(data[:-4] + struct.pack(">I", 3) + b"xyz").kind == 8
    assert framing.decode_error(b"oops").kind == framing.COMMON


@pytest.mark.parametrize(
    ("total", "header_len"),
    [
        (17, 0),
        (18, 19),
        (18 + framing.MAX_DATA + 1, 0),
        (18 + framing.MAX_HEADER + 1, framing.MAX_HEADER + 1),
    ],
)
def test_bad_prefixes_are_refused(total, header_len):
    prefix = framing.PREFIX.pack(total, header_len, 2, 1, 1, -1)
    with pytest.raises(framing.FrameError):
        framing.parse_prefix(prefix)


def test_decode_refuses_trailing_or_missing_bytes():
    raw = framing.request_frame(2, 1, b"abc").encode()
    with pytest.raises(framing.FrameError):
        framing.decode(raw + b"x")
    with pytest.raises(framing.FrameError):
        framing.decode(raw[:-1])
