"""Hostile clients against a real master and worker: memory stays flat (RSS from /proc), the
attackers are cut off, and a normal client is served throughout."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import time

import msgpack
import pytest

from fusecsi.cluster.local import LocalCluster
from fusecsi.rpc.blocking import call_sync
from fusecsi.rpc.framing import REQUEST

TOKEN = "hostile-test-token"
MiB = 1 << 20


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def frame(message) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def announce(address: tuple[str, int], length: int, *, hello: bool, sent: int) -> socket.socket:
    """A connection that announces a frame of `length` bytes and sends only `sent` of them."""
    s = socket.create_connection(address, timeout=30)
    if hello:
        s.sendall(frame([REQUEST, 1, "hello", [TOKEN]]))
        s.recv(100)
    s.sendall(struct.pack(">I", length) + b"\x00" * sent)
    return s


def served(addr: str) -> None:
    """The normal client: one call on a fresh connection."""
    assert call_sync(addr, "cluster_info", token=TOKEN, timeout=10)["cluster_id"]


def closed_by_server(s: socket.socket) -> bool:
    s.settimeout(30)
    with contextlib.suppress(ConnectionError):
        while s.recv(65536):
            pass
    return True


def hostport(addr: str) -> tuple[str, int]:
    host, port = addr.rsplit(":", 1)
    return host, int(port)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with LocalCluster(tmp_path_factory.mktemp("hostile"), workers=1, token=TOKEN) as c:
        served(c.master_addrs)
        yield c


def test_announced_frames_commit_no_memory(cluster):
    master = hostport(cluster.master_addrs)
    worker = ("127.0.0.1", cluster.worker_ports[0])
    pids = {"master": cluster.master.pid, "worker": cluster.workers[0].pid}
    before = {name: rss(pid) for name, pid in pids.items()}
    # before hello: 32 x 64 MiB at the master, 8 x 128 MiB at a worker (the attack)
    early = [announce(master, 64 * MiB, hello=False, sent=4096) for _ in range(32)]
    early += [announce(worker, 128 * MiB, hello=False, sent=4096) for _ in range(8)]
    # after hello the limit is the frame limit, but only bytes that arrived take memory
    late = [announce(master, 64 * MiB, hello=True, sent=256 << 10) for _ in range(32)]
    late += [announce(worker, 128 * MiB, hello=True, sent=256 << 10) for _ in range(8)]
    served(cluster.master_addrs)
    for name, pid in pids.items():
        grown = rss(pid) - before[name]
        assert grown < 48 * MiB, f"{name} grew by {grown >> 20} MiB"
    # the frames announced before hello are refused at once, with the reason
    for s in early:
        s.settimeout(10)
        reply = s.recv(4096)
        assert b"EPROTO" in reply and b"exceeds the limit of 16384" in reply
        s.close()
    for s in late:
        s.close()
    served(cluster.master_addrs)


def test_idle_and_half_sent_connections_are_closed(cluster):
    pid = cluster.master.pid
    master = hostport(cluster.master_addrs)
    before_rss, before_fds = rss(pid), fds(pid)
    idle = [socket.create_connection(master, timeout=30) for _ in range(1000)]
    # half a hello: a header, then silence
    idle += [announce(master, 100, hello=False, sent=10) for _ in range(20)]
    served(cluster.master_addrs)  # accepted after all the others: they are all open now
    grown = rss(pid) - before_rss
    assert grown < 48 * MiB, f"master grew by {grown >> 20} MiB with 1,020 idle connections"
    # unauthenticated connections are closed after the hello timeout, and served() works
    # all along
    for s in idle:
        assert closed_by_server(s)
        s.close()
    served(cluster.master_addrs)
    deadline = time.monotonic() + 30
    while fds(pid) > before_fds + 8 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert fds(pid) <= before_fds + 8


def test_a_low_soft_file_limit_is_raised(tmp_path):
    # the connection limit follows RLIMIT_NOFILE: a soft 1024 would cap it near 960
    import subprocess
    import sys

    from fusecsi.cluster.local import free_port

    address = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        ["prlimit", "--nofile=1024:8192", sys.executable, "-m", "fusecsi", "master"]
        + ["--data-dir", str(tmp_path), "--listen", address],
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                call_sync(address, "cluster_info", timeout=2)
                break
            time.sleep(0.1)
        with open(f"/proc/{proc.pid}/limits") as f:
            (line,) = [row for row in f if row.startswith("Max open files")]
        assert line.split()[3:5] == ["8192", "8192"]
    finally:
        proc.terminate()
        proc.wait(30)
