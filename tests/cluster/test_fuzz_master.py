"""Random calls with random arguments against a real master: every one gets a clear answer
(a result or an errno), never an internal error, and the master keeps serving."""

from __future__ import annotations

import errno

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusecsi.cluster.local import LocalCluster
from fusecsi.cluster.master.service import MasterService
from fusecsi.rpc.blocking import call_sync
from fusecsi.rpc.errors import RPCError

METHODS = sorted(MasterService.handlers(MasterService.__new__(MasterService)))

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.sampled_from([0, 1, 2, 3, 0o644, 0o40755, 2**63 - 1])
    | st.text(max_size=12)
    | st.sampled_from(["/", "/a", "/a/b", "", "//", "/..", "relative"])
    | st.binary(max_size=12)
    | st.sampled_from([b".", b"..", b"a/b", b"x" * 300, b"a\0", b"ok"])
)
_args = st.lists(
    st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3), max_leaves=6), max_size=7
)


@pytest.fixture(scope="module")
def fuzz_cluster(tmp_path_factory):
    with LocalCluster(tmp_path_factory.mktemp("fuzz"), workers=1, block_size=1 << 20) as c:
        yield c


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(method=st.sampled_from(METHODS), args=_args)
def test_random_calls_get_clear_answers(fuzz_cluster, method, args):
    try:
        call_sync(fuzz_cluster.master_addrs, method, *args, timeout=10)
    except RPCError as exc:
        assert exc.errno != errno.EIO or "internal error" not in exc.strerror, (method, args, exc)
        assert exc.errno not in (errno.ETIMEDOUT, errno.ECONNREFUSED), (method, args, exc)


def test_master_still_consistent_after_fuzzing(fuzz_cluster):
    addr = fuzz_cluster.master_addrs
    root = call_sync(addr, "getattr", 1)
    assert root[0] == 1
    call_sync(addr, "mkdirs", "/after/fuzz", 0o755, 0, 0)
    assert call_sync(addr, "resolve", "/after/fuzz")[1] & 0o170000 == 0o040000
    assert '"level":"error"' not in fuzz_cluster.log_text("master")
