"""Fixtures shared by every test directory."""

from __future__ import annotations

import pytest
from support.processes import Spawner


@pytest.fixture
def spawn(tmp_path):
    spawner = Spawner(tmp_path)
    yield spawner
    spawner.close()
