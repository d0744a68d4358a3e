"""One real SeaweedFS cluster per test module (starting one takes a few seconds)."""

from __future__ import annotations

import pytest

from fusecsi.engines.seaweedfs.local import SeaweedBackend


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    with SeaweedBackend(tmp_path_factory.mktemp("seaweedfs")) as running:
        yield running
