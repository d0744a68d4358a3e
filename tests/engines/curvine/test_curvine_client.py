"""The master client against stand-in masters: every RPC, error kinds, failover, time."""

from __future__ import annotations

import errno
import functools
import socket

import pytest
import trio
from curvine_standin import StandinMaster, Tree

from fusecsi.engines.base import Unreachable
from fusecsi.engines.curvine import framing
from fusecsi.engines.curvine.client import RENAME_NOREPLACE, MasterClient


async def test_every_rpc(master):
    async with MasterClient(master.address, timeout=5) as client:
        made = await client.mkdir("/a", create_parent=False, mode=0o750, x_attr={"user.t": b"v"})
        assert (made.path, made.is_dir, made.mode, dict(made.x_attr)) == (
            "/a",
            True,
            0o750,
            {"user.t": b"v"},
        )
        await client.mkdir("/a/b/c", create_parent=True)
        status = await client.file_status("/a/b")
        assert status.is_dir and status.name == "b"
        assert [s.name for s in await client.list_status("/a")] == ["b"]
        assert await client.rename("/a/b", "/a/d") is True
        assert [s.path for s in await client.list_status("/a")] == ["/a/d"]
        changed = await client.set_xattrs("/a", add={"user.x": b"1"}, remove=["user.t"])
        assert dict(changed.x_attr) == {"user.x": b"1"}
        await client.delete("/a", recursive=True)
        with pytest.raises(FileNotFoundError):
            await client.file_status("/a")
        info = await client.filesystem_info()
        assert (info.capacity, info.available) == (100 << 30, 60 << 30)
        assert info.active_master == master.address
    codes = [code for code, _ in master.requests]
    assert codes == [2, 2, 7, 8, 10, 8, 15, 3, 7, 14]


@pytest.mark.parametrize(
    ("prepare", "call", "code"),
    [
        (None, lambda c: c.file_status("/nope"), errno.ENOENT),  # FileNotFound 8
        ("/d", lambda c: c.mkdir("/d", create_parent=False), errno.EEXIST),  # FileAlreadyExists 7
        ("/d/e", lambda c: c.delete("/d", recursive=False), errno.ENOTEMPTY),  # DirNotEmpty 11
        (None, lambda c: c.rename("/x", "/y"), errno.ENOENT),
        ("/d/e", lambda c: c.rename("/d/e", "/d", flags=RENAME_NOREPLACE), errno.EEXIST),
        (None, lambda c: c.mkdir("/p/q", create_parent=False), errno.EIO),  # Common 10000
    ],
)
async def test_error_kinds_become_errnos(master, prepare, call, code):
    async with MasterClient(master.address, timeout=5) as client:
        if prepare:
            await client.mkdir(prepare, create_parent=True)
        with pytest.raises(OSError) as raised:
            await call(client)
    assert raised.value.errno == code
    assert raised.value.strerror.startswith(f"curvine master {master.address}: ")
    assert "\n" not in str(raised.value)


async def test_not_leader_fails_over_and_the_leader_is_remembered(pair):
    standby, leader = pair
    async with MasterClient(f"{standby.address},{leader.address}", timeout=5) as client:
        first = client.addrs.index(("127.0.0.1", int(standby.address.rsplit(":")[1])))
        client._leader = first  # as if the standby had been the leader before a failover
        await client.mkdir("/v", create_parent=False)
        assert len(standby.requests) == 1 and len(leader.requests) == 1
        # the same request (same req_id: the master's retry cache knows it) went on
        assert standby.requests[0] == leader.requests[0]
        await client.file_status("/v")
        assert len(standby.requests) == 1 and len(leader.requests) == 2
        # leadership moves: the old leader answers NotLeaderMaster, the other takes over
        leader.leader, standby.leader = False, True
        assert (await client.file_status("/v")).path == "/v"
        assert len(standby.requests) == 2 and len(leader.requests) == 3


async def test_no_leader_at_all_is_unreachable_after_the_timeout(pair):
    standby, leader = pair
    leader.leader = False
    async with MasterClient(f"{standby.address},{leader.address}", timeout=0.5) as client:
        started = trio.current_time()
        with pytest.raises(Unreachable) as raised:
            await client.file_status("/")
        took = trio.current_time() - started
    assert 0.5 <= took < 2.0
    assert "not the leader" in str(raised.value)
    assert len(standby.requests) >= 2  # retried in rounds while the masters elect


async def test_a_hung_master_times_out_and_another_answers(pair):
    standby, leader = pair
    standby.leader, standby.silent = True, True  # takes requests, never answers
    async with MasterClient(f"{standby.address},{leader.address}", timeout=2) as client:
        client._leader = client.addrs.index(("127.0.0.1", int(standby.address.rsplit(":")[1])))
        started = trio.current_time()
        assert (await client.file_status("/")).is_dir
        assert trio.current_time() - started < 1.5  # its share of the timeout, not all of it
    assert standby.requests and leader.requests


async def test_a_hung_only_master_is_unreachable(master):
    master.silent = True
    async with MasterClient(master.address, timeout=0.3) as client:
        with pytest.raises(Unreachable) as raised:
            await client.file_status("/")
    assert raised.value.errno == errno.ETIMEDOUT
    assert "no answer in time" in str(raised.value)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_refused_everywhere_is_unreachable_with_econnrefused():
    addrs = f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    async with MasterClient(addrs, timeout=0.3) as client:
        with pytest.raises(Unreachable) as raised:
            await client.filesystem_info()
    assert raised.value.errno == errno.ECONNREFUSED
    assert str(raised.value).count("connection refused") == 2


async def test_a_master_that_restarts_is_reconnected(nursery):
    tree = Tree()
    first = StandinMaster(tree)
    await nursery.start(first.serve)
    async with MasterClient(first.address, timeout=2) as client:
        await client.mkdir("/r", create_parent=False)
        # the master closes every connection (a restart): the next call reconnects
        await first.drop_connections()
        assert (await client.file_status("/r")).is_dir
        assert (await client.file_status("/r")).is_dir


async def test_heartbeats_before_a_reply_are_skipped(master):
    master.heartbeat_first = True
    async with MasterClient(master.address, timeout=2) as client:
        assert (await client.file_status("/")).is_dir
        assert (await client.file_status("/")).is_dir


async def test_a_reply_to_another_request_is_a_broken_connection(nursery):
    # a peer answering with a foreign req_id is not trusted: the connection is dropped
    async def liar(stream):
        async with stream:
            prefix = await stream.receive_some(22)
            _, _, code, _, req_id, _ = framing.PREFIX.unpack(prefix[:22])
            reply = framing.Frame(code, framing.REQ_RPC, framing.REP_SUCCESS, req_id + 1)
            await stream.send_all(reply.encode())
            await trio.sleep_forever()

    listeners = await nursery.start(functools.partial(trio.serve_tcp, liar, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    async with MasterClient(f"127.0.0.1:{port}", timeout=0.3) as client:
        with pytest.raises(Unreachable) as raised:
            await client.file_status("/")
    assert "while waiting for" in str(raised.value)


async def test_concurrent_calls_share_one_connection(master):
    results = []
    async with MasterClient(master.address, timeout=5) as client:

        async def one(n: int) -> None:
            await client.mkdir(f"/c{n}", create_parent=False)
            results.append((await client.file_status(f"/c{n}")).path)

        async with trio.open_nursery() as nursery:
            for n in range(20):
                nursery.start_soon(one, n)
        assert len(client._connections) == 1
    assert sorted(results) == sorted(f"/c{n}" for n in range(20))
    assert len({req_id for _, req_id in master.requests}) == 40
