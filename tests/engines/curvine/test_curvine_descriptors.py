"""Our Curvine protos agree with Curvine's, field by field, and the modules are fresh.

Always: our descriptors against curvine_upstream.json (facts from Curvine's own protos at
the commit it names). When Curvine's sources are here ($FUSECSI_CURVINE_UPSTREAM), that
JSON is also remade from them and must be what is committed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from curvine_upstream import DATA, ENV, extract, locate, ours

from fusecsi.engines.curvine.node import FLAGS

REPO = Path(__file__).resolve().parents[3]
UPSTREAM = json.loads(DATA.read_text())
OUR_MESSAGES, OUR_ENUMS = ours()


def test_the_upstream_commit_is_recorded():
    assert len(UPSTREAM["commit"]) == 40
    assert UPSTREAM["upstream"] == "github.com/CurvineIO/curvine"


@pytest.mark.parametrize("message", sorted(OUR_MESSAGES))
def test_every_field_we_declare_is_curvines(message):
    assert message in UPSTREAM["messages"], f"Curvine has no message {message}"
    upstream = UPSTREAM["messages"][message]
    for name, facts in OUR_MESSAGES[message].items():
        assert name in upstream, f"{message}.{name} is not a field of Curvine's {message}"
        assert facts == upstream[name], (
            f"{message}.{name}: ours {facts}, Curvine's {upstream[name]}"
        )


@pytest.mark.parametrize("message", sorted(OUR_MESSAGES))
def test_no_required_field_of_curvines_is_left_out(message):
    # a request without one would be refused by a strict decoder; a reply would not parse
    missing = [
        name
        for name, facts in UPSTREAM["messages"][message].items()
        if facts["label"] == "LABEL_REQUIRED" and name not in OUR_MESSAGES[message]
    ]
    assert not missing, f"{message} leaves out required {missing}"


def test_enums_are_curvines():
    assert OUR_ENUMS and set(OUR_ENUMS) <= set(UPSTREAM["enums"])
    for name, values in OUR_ENUMS.items():
        assert values == UPSTREAM["enums"][name], name


def test_the_package_is_curvines():
    from fusecsi.engines.curvine import common_pb2, master_pb2

    assert common_pb2.DESCRIPTOR.package == master_pb2.DESCRIPTOR.package == "proto"


def test_passthrough_flags_are_curvine_fuse_flags():
    unknown = set(FLAGS) - set(UPSTREAM["fuse_flags"])
    assert not unknown, f"not flags of curvine-fuse: {sorted(unknown)}"
    # what fusecsi sets itself never passes through
    assert not {"master-addrs", "fs-path", "mnt-path", "conf", "mnt-number"} & set(FLAGS)


def test_the_recorded_facts_are_upstreams():
    root = locate()
    if root is None:
        pytest.skip(
            f"Curvine's sources are not on this machine (set {ENV} to a checkout or git "
            "directory of CurvineIO/curvine): compared with the committed "
            f"{DATA.name} only"
        )
    fresh = extract(root, UPSTREAM["commit"])
    assert fresh == UPSTREAM, f"{DATA.name} differs from Curvine at {UPSTREAM['commit']}"


def test_committed_modules_match_a_fresh_generation(tmp_path):
    generator = Path(__file__).with_name("curvine_gen_proto.py")
    subprocess.run(
        [sys.executable, str(generator), "--out", str(tmp_path)], check=True, capture_output=True
    )
    package = "fusecsi/engines/curvine"
    stale = [
        name
        for name in ("common_pb2.py", "master_pb2.py")
        if (tmp_path / package / name).read_bytes() != (REPO / package / name).read_bytes()
    ]
    assert not stale, f"{package}/{', '.join(stale)} out of date: run {generator.name}"
