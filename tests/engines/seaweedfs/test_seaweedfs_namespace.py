"""The SeaweedFS Namespace (controller side) against a real master, volume server and filer."""

from __future__ import annotations

import errno
import itertools
import os
import socket
import time
import urllib.request

import pytest
import trio

from fusecsi import engines
from fusecsi.engines.base import Cluster, Node, Unreachable
from fusecsi.engines.seaweedfs import http
from fusecsi.engines.seaweedfs import namespace as namespace_module
from fusecsi.engines.seaweedfs.local import SeaweedBackend

NODE = engines.node_engine("seaweedfs")
VOLUME = b"trusted.fusecsi.volume"
OWNER = b"trusted.fusecsi.owner"
_names = itertools.count()


def cluster_of(backend: SeaweedBackend, **overrides: str) -> Cluster:
    return NODE.parse_cluster({**backend.parameters, **overrides}, backend.secrets)


def ns_of(backend: SeaweedBackend, timeout: float = 10.0):
    return engines.open_namespace(cluster_of(backend), timeout=timeout)


def fresh_base() -> str:
    return f"/t{os.getpid()}-{next(_names)}"


def put_file(backend: SeaweedBackend, path: str, data: bytes) -> None:
    request = urllib.request.Request(backend.filer_url + path, data=data, method="PUT")
    with urllib.request.urlopen(request, timeout=10):
        pass


def get_file(backend: SeaweedBackend, path: str) -> bytes:
    with urllib.request.urlopen(backend.filer_url + path, timeout=10) as response:
        return response.read()


def raw_entry(backend: SeaweedBackend, path: str) -> dict:
    import json

    with urllib.request.urlopen(f"{backend.filer_url}{path}?metadata=true", timeout=10) as r:
        return json.loads(r.read())


async def test_tagged_create_tags_and_recorded_quota(backend):
    base = fresh_base()
    async with ns_of(backend) as ns:
        assert ns.quota_enforced is False
        await ns.mkdirs(base + "/vols")
        await ns.mkdirs(base + "/vols")  # existing: fine
        path = base + "/vols/pvc-a"
        await ns.mkdir_tagged(path, 0o750, {VOLUME: b"id-a", OWNER: b"pvc-a"}, 1 << 30)

        assert await ns.lookup(path) == Node(path, True)
        assert raw_entry(backend, path)["Mode"] & 0o777 == 0o750
        assert await ns.get_tag(path, VOLUME) == b"id-a"
        assert await ns.get_tag(path, OWNER) == b"pvc-a"
        assert await ns.get_tag(path, b"trusted.fusecsi.parent") is None
        assert await ns.get_quota(path) == 1 << 30
        assert await ns.listdir(base + "/vols") == [Node(path, True)]

        with pytest.raises(FileExistsError):
            await ns.mkdir_tagged(path, 0o750, {VOLUME: b"other"}, None)
        assert await ns.get_tag(path, VOLUME) == b"id-a"  # the loser changed nothing

        # values survive any bytes, the empty value included
        for value in (b"\x00\xff\r\n %=x", b"", "välue".encode()):
            await ns.set_tag(path, OWNER, value)
            assert await ns.get_tag(path, OWNER) == value
        await ns.remove_tag(path, OWNER)
        assert await ns.get_tag(path, OWNER) is None
        assert await ns.get_tag(path, VOLUME) == b"id-a"  # only the named tag went
        with pytest.raises(OSError) as removed:
            await ns.remove_tag(path, OWNER)
        assert removed.value.errno == errno.ENODATA

        await ns.set_quota(path, 5 << 30)
        assert await ns.get_quota(path) == 5 << 30

        # a tag set by hand, not through fusecsi, reads as it is
        request = urllib.request.Request(
            f"{backend.filer_url}{path}?tagging",
            method="PUT",
            headers={"Seaweed-trusted.fusecsi.owner": "by-hand"},
        )
        await trio.to_thread.run_sync(lambda: urllib.request.urlopen(request, timeout=10).close())
        assert await ns.get_tag(path, OWNER) == b"by-hand"

        untagged = base + "/vols/plain"
        await ns.mkdirs(untagged)
        assert await ns.get_tag(untagged, VOLUME) is None
        assert await ns.get_quota(untagged) is None


async def test_refusals(backend):
    base = fresh_base()
    async with ns_of(backend) as ns:
        await ns.mkdirs(base)
        with pytest.raises(FileNotFoundError):
            await ns.mkdir_tagged(base + "/missing/pvc", 0o755, {VOLUME: b"x"}, None)
        assert await ns.lookup(base + "/missing") is None  # the filer would have made it
        with pytest.raises(FileNotFoundError):
            await ns.get_tag(base + "/nothing", VOLUME)
        with pytest.raises(FileNotFoundError):
            await ns.set_tag(base + "/nothing", VOLUME, b"x")
        for bad in (base + "/../etc", "relative", base + "//x", base + "/x/"):
            with pytest.raises(OSError) as info:
                await ns.lookup(bad)
            assert info.value.errno == errno.EINVAL, bad
        for bad_name in (b"Trusted.x", b"", b"a,b", b"a b"):
            with pytest.raises(OSError) as info:
                await ns.mkdir_tagged(base + "/n", 0o755, {bad_name: b"v"}, None)
            assert info.value.errno == errno.EINVAL
        assert await ns.lookup(base + "/n") is None  # refused before anything was made
        put_file(backend, base + "/file", b"data")
        assert await ns.lookup(base + "/file") == Node(base + "/file", False)
        with pytest.raises(NotADirectoryError):
            await ns.listdir(base + "/file")
        with pytest.raises(NotADirectoryError):
            await ns.mkdirs(base + "/file/sub")
        with pytest.raises(NotADirectoryError):
            await ns.rmdir(base + "/file")
        with pytest.raises(OSError) as root:
            await ns.remove_tree("/")
        assert root.value.errno == errno.EBUSY


async def test_failed_tagging_takes_the_fresh_directory_back(backend, monkeypatch):
    base = fresh_base()
    async with ns_of(backend) as ns:
        await ns.mkdirs(base)
        with pytest.raises(OSError) as too_large:
            await ns.mkdir_tagged(base + "/v", 0o755, {VOLUME: b"x" * (2 << 20)}, None)
        assert too_large.value.errno == errno.EINVAL
        assert await ns.lookup(base + "/v") is None  # refused before the mkdir

        # without our own limit the filer refuses the tag (its header limit is 1 MiB)
        # after the mkdir succeeded: the fresh directory must not stay behind untagged
        monkeypatch.setattr(namespace_module, "MAX_TAG_VALUE", 1 << 30)
        with pytest.raises(OSError):
            await ns.mkdir_tagged(base + "/v", 0o755, {VOLUME: b"x" * (2 << 20)}, None)
        assert await ns.lookup(base + "/v") is None
        await ns.mkdir_tagged(base + "/v", 0o755, {VOLUME: b"v"}, None)  # the name is free


async def test_names_that_need_quoting(backend):
    base = fresh_base()
    odd = base + "/a b?c#d%e&f=g+h;ü"
    async with ns_of(backend) as ns:
        await ns.mkdirs(base)
        await ns.mkdir_tagged(odd, 0o755, {VOLUME: b"odd"}, 7)
        assert await ns.listdir(base) == [Node(odd, True)]
        assert await ns.get_tag(odd, VOLUME) == b"odd" and await ns.get_quota(odd) == 7
        await ns.rename(odd, odd + "-moved")
        assert await ns.lookup(odd) is None
        await ns.remove_tree(odd + "-moved")
        assert await ns.listdir(base) == []


async def test_rename_does_not_replace(backend):
    base = fresh_base()
    async with ns_of(backend) as ns:
        await ns.mkdirs(base)
        await ns.mkdir_tagged(base + "/a", 0o755, {VOLUME: b"a"}, None)
        await ns.mkdir_tagged(base + "/b", 0o755, {VOLUME: b"b"}, None)
        put_file(backend, base + "/a/data", b"payload-a")
        put_file(backend, base + "/b/data", b"payload-b")

        with pytest.raises(FileExistsError):
            await ns.rename(base + "/a", base + "/b")
        assert await ns.get_tag(base + "/b", VOLUME) == b"b"
        assert await ns.get_tag(base + "/a", VOLUME) == b"a"

        await ns.mkdirs(base + "/archive")
        await ns.rename(base + "/a", base + "/archive/a-1")
        assert await ns.lookup(base + "/a") is None
        assert await ns.get_tag(base + "/archive/a-1", VOLUME) == b"a"
        assert get_file(backend, base + "/archive/a-1/data") == b"payload-a"

        with pytest.raises(FileNotFoundError):
            await ns.rename(base + "/a", base + "/c")
        with pytest.raises(FileNotFoundError):
            await ns.rename(base + "/b", base + "/nowhere/b")
        with pytest.raises(OSError) as inside:
            await ns.rename(base + "/b", base + "/b/x")
        assert inside.value.errno == errno.EINVAL


async def test_rmdir_and_remove_tree(backend):
    base = fresh_base()
    async with ns_of(backend) as ns:
        await ns.mkdirs(base + "/tree/deep/er")
        put_file(backend, base + "/tree/deep/er/f", b"x" * 1000)
        put_file(backend, base + "/tree/g", b"y")
        with pytest.raises(OSError) as not_empty:
            await ns.rmdir(base + "/tree")
        assert not_empty.value.errno == errno.ENOTEMPTY
        assert await ns.lookup(base + "/tree/deep/er/f") is not None

        await ns.mkdirs(base + "/empty")
        await ns.rmdir(base + "/empty")
        assert await ns.lookup(base + "/empty") is None
        with pytest.raises(FileNotFoundError):
            await ns.rmdir(base + "/empty")

        await ns.remove_tree(base + "/tree")
        assert await ns.lookup(base + "/tree") is None
        assert await ns.listdir(base) == []
        await ns.remove_tree(base + "/tree")  # nothing there is fine (the contract)
        put_file(backend, base + "/plain", b"x")
        with pytest.raises(NotADirectoryError):
            await ns.remove_tree(base + "/plain")
        await ns.sync()


async def test_listdir_pages(backend, monkeypatch):
    base = fresh_base()
    names = [f"{base}/d{i:02d}" for i in range(12)]
    async with ns_of(backend) as ns:
        for name in names:
            await ns.mkdirs(name)
        put_file(backend, base + "/z-file", b"")
        expected = [*names, base + "/z-file"]
        # one page this long comes chunked from the filer: the decoder meets the real thing
        raw = await http.request([("127.0.0.1", backend.filer[0])], "GET", base + "/", within=10)
        assert raw.headers.get("transfer-encoding") == "chunked"
        assert len(raw.json()["Entries"]) == 13
        assert sorted(n.path for n in await ns.listdir(base)) == expected

        monkeypatch.setattr(namespace_module, "_PAGE", 3)  # several pages, few entries
        listed = sorted(await ns.listdir(base), key=lambda n: n.path)
        assert [n.path for n in listed] == expected
        assert [n.is_dir for n in listed] == [True] * 12 + [False]


async def test_capacity_from_the_volume_servers(backend):
    async with ns_of(backend) as ns:
        free = await ns.capacity("/not-made-yet")  # GetCapacity may come before any volume
    disk = os.statvfs(backend.base)
    # the volume server reports its disk's free space; other writers move it a little
    assert abs(free - disk.f_bavail * disk.f_frsize) < 512 << 20, (free, disk)

    filers_only = NODE.parse_cluster({"filer-addrs": backend.filer_addr}, {})
    async with engines.open_namespace(filers_only, timeout=10) as ns:
        with pytest.raises(OSError) as info:
            await ns.capacity("/")
    assert info.value.errno == errno.ENOTSUP
    assert "master-addrs" in str(info.value)


async def test_filer_that_hangs_is_unreachable_within_the_deadline():
    # a real listening socket that never answers: what a wedged filer looks like
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        cluster = NODE.parse_cluster({"filer-addrs": f"127.0.0.1:{port}"}, {})
        async with engines.open_namespace(cluster, timeout=1.0) as ns:
            started = time.monotonic()
            with pytest.raises(Unreachable) as info:
                await ns.lookup("/x")
            elapsed = time.monotonic() - started
        assert info.value.errno == errno.ETIMEDOUT
        assert 0.9 < elapsed < 3.0
        # the probe of a filer that hangs hangs too: the caller's deadline is what ends it
        with trio.move_on_after(1.0) as probing:
            await NODE.probe(cluster)
        assert probing.cancelled_caught


async def test_filer_that_drops_the_connection_is_unreachable():
    # a real socket that takes the request and closes without a (complete) answer: a
    # filer that crashed mid-call
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        cluster = NODE.parse_cluster({"filer-addrs": f"127.0.0.1:{port}"}, {})

        def answer_badly(reply: bytes) -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(reply)

        for reply in (b"", b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.to_thread.run_sync, answer_badly, reply)
                async with engines.open_namespace(cluster, timeout=5) as ns:
                    with pytest.raises(Unreachable) as info:
                        await ns.lookup("/x")
            assert info.value.errno == errno.ECONNRESET
            assert "dropped the connection" in str(info.value)


async def test_filer_down_then_back(backend):
    base = fresh_base()
    cluster = cluster_of(backend)
    async with ns_of(backend, timeout=5.0) as ns:
        await ns.mkdirs(base)
        await ns.mkdir_tagged(base + "/kept", 0o755, {VOLUME: b"kept"}, 123)
    assert await NODE.probe(cluster) is None

    backend.stop_filer()
    try:
        async with ns_of(backend, timeout=5.0) as ns:
            started = time.monotonic()
            with pytest.raises(Unreachable) as info:
                await ns.get_tag(base + "/kept", VOLUME)
            assert time.monotonic() - started < 5.5
            assert info.value.errno == errno.ECONNREFUSED
            assert "filer" in str(info.value) and "\n" not in str(info.value)
        assert isinstance(await NODE.probe(cluster), Unreachable)
    finally:
        backend.start_filer()

    assert await NODE.probe(cluster) is None
    async with ns_of(backend) as ns:
        assert await ns.get_tag(base + "/kept", VOLUME) == b"kept"
        assert await ns.get_quota(base + "/kept") == 123


async def test_second_filer_address_is_tried_when_the_first_refuses(backend):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead = closed.getsockname()[1]  # bound, not listening: connection refused
        cluster = NODE.parse_cluster(
            {"filer-addrs": f"127.0.0.1:{dead},{backend.filer_addr}"}, backend.secrets
        )
        async with engines.open_namespace(cluster, timeout=5) as ns:
            assert await ns.lookup("/") == Node("/", True)


def test_jwt_protected_filer_needs_the_secret(tmp_path):
    key, read_key = (f"test-{kind}-key-{os.urandom(4).hex()}" for kind in ("write", "read"))

    async def attempt(secrets: dict[str, str]) -> None:
        cluster = NODE.parse_cluster(protected.parameters, secrets)
        async with engines.open_namespace(cluster, timeout=10) as ns:
            await ns.mkdirs("/jwt")
            await ns.mkdir_tagged("/jwt/v", 0o755, {VOLUME: b"j"}, None)
            assert await ns.get_tag("/jwt/v", VOLUME) == b"j"

    with SeaweedBackend(tmp_path, jwt_key=key, jwt_read_key=read_key) as protected:
        for partial in ({}, {"jwt-filer-signing-key": key}):
            with pytest.raises(PermissionError):
                trio.run(attempt, partial)
        trio.run(attempt, protected.secrets)
        cluster = NODE.parse_cluster(protected.parameters, protected.secrets)
        assert key not in repr(cluster) and read_key not in repr(cluster)
        # weed mount speaks gRPC, which the keys do not guard: the node needs no secret
        assert trio.run(NODE.probe, cluster) is None
        launch = NODE.launch(cluster, "/jwt", {}, str(tmp_path / "m"))
        assert not any(k in " ".join(launch.argv) for k in (key, read_key))
