"""Stand-in Curvine masters on loopback (see curvine_standin.py for why they exist)."""

from __future__ import annotations

import pytest
from curvine_standin import StandinMaster, Tree


@pytest.fixture
async def master(nursery) -> StandinMaster:
    standin = StandinMaster()
    await nursery.start(standin.serve)
    return standin


@pytest.fixture
async def pair(nursery) -> tuple[StandinMaster, StandinMaster]:
    """Two masters of one cluster (one tree): the first a standby, the second the leader."""
    tree = Tree()
    standby, leader = StandinMaster(tree, leader=False), StandinMaster(tree, leader=True)
    await nursery.start(standby.serve)
    await nursery.start(leader.serve)
    return standby, leader
