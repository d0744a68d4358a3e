"""200 random publishes and unpublishes, 16 in flight: table, mounts and daemons must agree."""

from __future__ import annotations

import random

import trio
from support.mountd import (  # noqa: F401 - fixtures
    cluster_fixture,
    errno_of,
    make_dirs,
    mountd_fixture,
    read_write,
)

from fusecsi.mountd.client import RPCError

OPERATIONS = 200
IN_FLIGHT = 16
KEYS = [("/storm-a", ""), ("/storm-b", ""), ("/storm-a", "entry-timeout=2")]


async def test_publish_unpublish_storm_ends_consistent(mountd, cluster):
    rng = random.Random(6)
    volumes = [(f"vol{i}", *KEYS[i % 3], f"v{i}") for i in range(9)]
    await make_dirs(cluster, *(f"{fs}/{sub}" for _, fs, _, sub in volumes))
    targets = [mountd.target(f"pod{p}", f"pv{k}") for p in range(4) for k in range(3)]
    model: dict[str, tuple | None] = dict.fromkeys(targets)
    target_locks = {t: trio.Lock() for t in targets}
    in_flight = trio.CapacityLimiter(IN_FLIGHT)
    outcomes: dict[str, int] = {}

    async def operation(target: str, volume: tuple, publish: bool) -> None:
        async with in_flight, target_locks[target]:
            held = model[target]
            if publish:
                vid, fs_path, options, subpath = volume
                try:
                    await mountd.publish(vid, fs_path, subpath, target, options=options)
                except RPCError as exc:
                    assert errno_of(exc) == "EEXIST" and held not in (None, volume), exc
                    outcomes["EEXIST"] = outcomes.get("EEXIST", 0) + 1
                    return
                assert held in (None, volume)
                model[target] = volume
                outcomes["published"] = outcomes.get("published", 0) + 1
            else:
                vid = (held or volume)[0]
                answer = await mountd.client.unpublish(vid, target)
                assert answer == {"removed": held is not None}
                model[target] = None
                outcomes["unpublished"] = outcomes.get("unpublished", 0) + 1

    async with trio.open_nursery() as nursery:
        for _ in range(OPERATIONS):
            nursery.start_soon(
                operation, rng.choice(targets), rng.choice(volumes), rng.random() < 0.5
            )
    assert (
        sum(outcomes.values()) == OPERATIONS
        and outcomes.get("EEXIST")
        and outcomes.get("unpublished")
    )

    published = {t: v for t, v in model.items() if v is not None}
    rows = await mountd.client.list()
    table = {r["target"]: (r["volume_id"], row["fs_path"]) for row in rows for r in row["refs"]}
    assert table == {t: (v[0], v[1]) for t, v in published.items()}
    assert all(row["refs"] for row in rows)  # linger 0: no daemon without references
    assert len(rows) == len({(v[1], v[2]) for v in published.values()})
    assert mountd.daemon_pids() == sorted(row["pid"] for row in rows)
    daemon_mounts, bound = mountd.fuse_mounts()
    assert daemon_mounts == sorted(row["mountpoint"] for row in rows)
    assert bound == sorted(published)
    for target, volume in published.items():
        assert read_write(target, "storm", volume[0])

    async with trio.open_nursery() as nursery:
        for target, volume in published.items():
            nursery.start_soon(mountd.client.unpublish, volume[0], target)
    assert await mountd.client.list() == []
    assert mountd.daemon_pids() == [] and mountd.fuse_mounts() == ([], [])
