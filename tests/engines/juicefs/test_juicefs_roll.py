"""mountd's roll (fusecsi/mountd/rolling.py) on JuiceFS: the engine's own hand_over, then the
successor on the descriptor mountd keeps; under load nothing fails and nothing is re-bound
(real juicefs, real mounts; helpers of test_juicefs_takeover.py)."""

from __future__ import annotations

import trio
from support import takeover_load
from test_juicefs_takeover import (  # noqa: F401 - fixtures
    GRACE,
    assert_no_error,
    assert_stops_clean,
    base,
    held_open,
    off_thread,
    processes,
    publish,
    session_of,
    supervisor,
)

from fusecsi.mountd import mounts

ROLLS = 2


async def test_roll_hands_juicefs_over_with_no_error(redis_fs, base, tmp_path, processes):  # noqa: F811
    async with supervisor(base) as sup:
        target = await publish(sup, redis_fs, "v1")
        [key_id] = sup.table.entries
        entry = sup.table.entries[key_id]
        layers = [m.mount_id for m in mounts.stack_at(target)]
        session = await off_thread(session_of, entry.mountpoint)
        prober, load, report_path = await held_open(target, tmp_path, processes)
        try:
            for _ in range(ROLLS):
                await trio.sleep(0.5)
                pid = entry.pid
                [done] = await sup.roll(grace=GRACE)
                assert done["result"] == "rolled" and done["old_pid"] == pid, done
                assert done["new_pid"] == entry.pid != pid and done["build"] == entry.build
            after = await off_thread(prober.probe)
            await trio.sleep(0.5)
        finally:
            report = await off_thread(takeover_load.finish, load, report_path, seconds=150)
        print("after the rolls:", after, takeover_load.summary(report))
        assert_no_error(after, report)
        assert [m.mount_id for m in mounts.stack_at(target)] == layers
        assert await off_thread(session_of, entry.mountpoint) == session
        assert entry.restarts == 0 and sup.recoveries.counts == {}
        last = await off_thread(prober.quit)
        assert last == {"close": "ok", "log_exact": True, "synced": last["synced"]}
        await assert_stops_clean(sup, base, target)
