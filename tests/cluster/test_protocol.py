"""msgpack-RPC framing, server and client on real sockets (TCP loopback and unix)."""

from __future__ import annotations

import errno
import socket
import struct

import msgpack
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusecsi.rpc import server
from fusecsi.rpc.blocking import call_sync
from fusecsi.rpc.connection import connect
from fusecsi.rpc.errors import ProtocolError, RPCError
from fusecsi.rpc.framing import REQUEST, FrameSocket
from fusecsi.rpc.pool import Pool
from fusecsi.rpc.server import Server


async def _echo(value):
    return value


async def _sleep_then(seconds, value):
    await trio.sleep(seconds)
    return value


def _fail(name):
    raise OSError(getattr(errno, name), f"failing with {name}")


HANDLERS = {
    "echo": _echo,
    "sleep_then": _sleep_then,
    "fail": _fail,
    "add": lambda a, b: a + b,
}


async def _serve(nursery, *, token=None, max_frame=1 << 20, family=socket.AF_INET, path=None):
    server = Server(HANDLERS, token=token, max_frame=max_frame, name="test")
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    await sock.bind(path if family == socket.AF_UNIX else ("127.0.0.1", 0))
    addr = await nursery.start(server.serve, sock)
    return f"unix:{path}" if family == socket.AF_UNIX else f"{addr[0]}:{addr[1]}"


async def test_many_calls_in_flight_replies_out_of_order():
    async with trio.open_nursery() as nursery:
        addr = await _serve(nursery)
        conn = await connect(nursery, addr)
        order = []

        async def one(i):
            value = await conn.call("sleep_then", (10 - i) * 0.02, i)
            order.append(value)
            assert value == i

        async with trio.open_nursery() as calls:
            for i in range(10):
                calls.start_soon(one, i)
        # the slowest request was sent first and answered last
        assert order == list(range(9, -1, -1))
        assert await conn.call("add", 2, 3) == 5
        assert await conn.call("echo", b"\x00" * 100_000) == b"\x00" * 100_000
        nursery.cancel_scope.cancel()


async def test_errors_carry_errno_and_server_keeps_serving():
    async with trio.open_nursery() as nursery:
        addr = await _serve(nursery)
        conn = await connect(nursery, addr)
        for name in ("ENOENT", "EEXIST", "ENOTEMPTY", "EDQUOT", "ENAMETOOLONG"):
            with pytest.raises(RPCError) as info:
                await conn.call("fail", name)
            assert info.value.errno == getattr(errno, name)
            assert name in str(info.value)
        with pytest.raises(RPCError) as info:
            await conn.call("no_such_method")
        assert info.value.errno == errno.ENOSYS and "unknown method" in info.value.strerror
        with pytest.raises(RPCError) as info:
            await conn.call("add", 1)  # wrong number of arguments
        assert info.value.errno == errno.EINVAL
        with pytest.raises(RPCError) as info:
            await conn.call("add", 1, "x")  # wrong type
        assert info.value.errno == errno.EINVAL
        assert await conn.call("add", 1, 1) == 2
        nursery.cancel_scope.cancel()


def _raw_frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def _read_reply(sock: socket.socket):
    header = sock.recv(4, socket.MSG_WAITALL)
    if len(header) < 4:
        return None
    (n,) = struct.unpack(">I", header)
    return msgpack.unpackb(sock.recv(n, socket.MSG_WAITALL), raw=False)


async def test_bad_frames_drop_only_that_connection():
    async with trio.open_nursery() as nursery:
        addr = await _serve(nursery, max_frame=1 << 16)
        good = await connect(nursery, addr)
        host, port = addr.split(":")

        def attack(data: bytes):
            with socket.create_connection((host, int(port)), timeout=5) as s:
                s.sendall(data)
                reply = _read_reply(s)
                assert s.recv(1) == b""  # then the server hangs up
                return reply

        oversized = struct.pack(">I", 1 << 20) + b"x" * 10
        reply = await trio.to_thread.run_sync(attack, oversized)
        assert reply[2][0] == "EPROTO" and "exceeds the limit" in reply[2][1]
        reply = await trio.to_thread.run_sync(attack, _raw_frame(b"\xc1\xc1\xc1"))
        assert reply[2][0] == "EPROTO" and "undecodable" in reply[2][1]
        reply = await trio.to_thread.run_sync(attack, _raw_frame(msgpack.packb({"a": 1})))
        assert reply[2][0] == "EPROTO" and "expected a request" in reply[2][1]
        assert await good.call("echo", "still here") == "still here"
        nursery.cancel_scope.cancel()


async def test_token_is_checked_at_connection_start():
    async with trio.open_nursery() as nursery:
        addr = await _serve(nursery, token="s3cret")
        conn = await connect(nursery, addr, token="s3cret")
        assert await conn.call("echo", 1) == 1
        with pytest.raises(RPCError) as info:
            await connect(nursery, addr, token="wrong")
        assert info.value.errno == errno.EACCES and "bad token" in info.value.strerror
        anonymous = await connect(nursery, addr)
        with pytest.raises(RPCError) as info:
            await anonymous.call("echo", 1)
        assert info.value.errno == errno.EACCES and "authentication required" in str(info.value)
        nursery.cancel_scope.cancel()


async def test_unix_socket_and_blocking_helper(tmp_path):
    path = str(tmp_path / "rpc.sock")
    async with trio.open_nursery() as nursery:
        addr = await _serve(nursery, family=socket.AF_UNIX, path=path, token="t")
        pool = Pool(nursery, token="t")
        assert await pool.call(addr, "add", 40, 2) == 42
        result = await trio.to_thread.run_sync(
            lambda: call_sync(addr, "echo", [1, b"x"], token="t")
        )
        assert result == [1, b"x"]
        pool.close()
        nursery.cancel_scope.cancel()


async def test_pool_reconnects_after_server_restart():
    async with trio.open_nursery() as nursery:
        server_scope = trio.CancelScope()
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

        async def serve_once(sock, task_status=trio.TASK_STATUS_IGNORED):
            with server_scope:
                await Server(HANDLERS).serve(sock, task_status=task_status)

        await nursery.start(serve_once, sock)
        pool = Pool(nursery, timeout=5)
        addr = f"127.0.0.1:{port}"
        assert await pool.call(addr, "echo", 1) == 1
        server_scope.cancel()
        await trio.sleep(0.05)
        sock2 = trio.socket.socket()
        sock2.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await sock2.bind(("127.0.0.1", port))
        await nursery.start(Server(HANDLERS).serve, sock2)
        assert await pool.call(addr, "echo", 2, idempotent=True) == 2
        pool.close()
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------- fuzzing

_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5), inner, max_size=5)
    ),
    max_leaves=20,
)


async def _decode(data: bytes):
    a, b = trio.socket.socketpair()
    with a, b:
        await b.send(data)
        b.shutdown(socket.SHUT_WR)
        reader = FrameSocket(a, max_frame=4096)
        out = []
        try:
            while True:
                out.append(await reader.read_frame())
        except (EOFError, ProtocolError):
            return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_fuzz_decoder_raw_bytes(data):
    # any byte string decodes to frames, or ends in a clean EOF / ProtocolError — nothing else
    trio.run(_decode, data)


@settings(max_examples=200, deadline=None)
@given(st.lists(_values, max_size=4))
def test_fuzz_decoder_roundtrip(values):
    data = b"".join(_raw_frame(msgpack.packb(v, use_bin_type=True)) for v in values)
    assert trio.run(_decode, data) == values


@settings(max_examples=150, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=200).map(_raw_frame),
        _values.map(lambda v: _raw_frame(msgpack.packb(v, use_bin_type=True))),
        st.tuples(st.text(max_size=10), st.lists(_values, max_size=3)).map(
            lambda t: _raw_frame(msgpack.packb([REQUEST, 7, t[0], t[1]], use_bin_type=True))
        ),
    )
)
def test_fuzz_live_server(fuzz_server, frame):
    """Whatever one peer sends, the server keeps answering others."""
    with socket.create_connection(fuzz_server, timeout=5) as s:
        s.sendall(frame)
        s.shutdown(socket.SHUT_WR)
        while s.recv(65536):
            pass
    assert call_sync(f"{fuzz_server[0]}:{fuzz_server[1]}", "add", 1, 2) == 3


@pytest.fixture(scope="module")
def fuzz_server():
    """A protocol server in a thread of its own (hypothesis drives it synchronously)."""
    import threading

    ready = threading.Event()
    box = {}

    async def main():
        async with trio.open_nursery() as nursery:
            box["addr"] = await _serve(nursery)
            box["stop"] = trio.lowlevel.current_trio_token()
            box["scope"] = nursery.cancel_scope
            ready.set()

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    assert ready.wait(10)
    host, port = box["addr"].split(":")
    yield host, int(port)
    box["stop"].run_sync_soon(box["scope"].cancel)
    thread.join(10)


async def test_connections_beyond_the_per_peer_limit_are_closed_at_once():
    async with trio.open_nursery() as nursery:
        server = Server(HANDLERS, name="test", max_conns_per_peer=3)
        sock = trio.socket.socket()
        await sock.bind(("127.0.0.1", 0))
        host, port = await nursery.start(server.serve, sock)
        addr = f"{host}:{port}"
        kept = [await connect(nursery, addr) for _ in range(3)]
        extra = await connect(nursery, addr)
        with pytest.raises(RPCError) as caught:
            await extra.call("add", 1, 2)
        assert caught.value.errno == errno.ECONNRESET
        assert [await c.call("add", i, 1) for i, c in enumerate(kept)] == [1, 2, 3]
        assert server.open_conns == 3
        nursery.cancel_scope.cancel()


async def test_a_pooled_connection_idle_near_the_server_limit_is_replaced(mock_clock):
    # the server closes connections idle for IDLE_TIMEOUT; a client must never send a
    # request on one just as that happens, so it opens a fresh one well before
    async with trio.open_nursery() as nursery:
        addr = await _serve(nursery)
        pool = Pool(nursery)
        assert await pool.call(addr, "add", 1, 1) == 2
        (first,) = pool._conns[addr]
        mock_clock.jump(server.REUSE_IDLE - 1)
        assert await pool.call(addr, "add", 1, 2) == 3
        assert pool._conns[addr] == [first]  # still fresh enough
        mock_clock.jump(server.REUSE_IDLE + 1)
        assert await pool.call(addr, "add", 1, 3) == 4
        assert not first.usable and pool._conns[addr][-1] is not first
        pool.close()
        nursery.cancel_scope.cancel()
