"""Fixtures shared by every test directory."""

from __future__ import annotations

import pytest
from spawning import Spawner


@pytest.fixture
def spawn(tmp_path):
    spawner = Spawner(tmp_path)
    yield spawner
    spawner.close()
