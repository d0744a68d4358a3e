"""The import rule of mountd (docs/contracts.md): engines only through the seam.

Reads every module of fusecsi/mountd/ (and the node plugin) with `ast`, top-level and
function-level imports alike, so a lazy import cannot slip past.
"""

from __future__ import annotations

import ast
from pathlib import Path

import fusecsi

PACKAGE = Path(fusecsi.__file__).parent
SEAM = ("fusecsi.engines", "fusecsi.engines.base")


def imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def breaks_rule(name: str) -> bool:
    if name.startswith("fusecsi.cluster"):
        return True  # the embedded cluster's client belongs to its engine
    if name.startswith("fusecsi.engines."):
        return name not in SEAM and not name.startswith("fusecsi.engines.base.")
    return False


def test_mountd_and_the_node_plugin_reach_engines_only_through_the_seam():
    files = sorted((PACKAGE / "mountd").glob("*.py")) + [PACKAGE / "csi" / "node" / "service.py"]
    assert len(files) > 10
    broken = {
        f"{path.relative_to(PACKAGE)}: {name}"
        for path in files
        for name in imported(path)
        if breaks_rule(name)
    }
    assert broken == set()


def test_the_rule_catches_what_it_forbids():
    assert breaks_rule("fusecsi.cluster.client")
    assert breaks_rule("fusecsi.cluster.client.ClusterClient")
    assert breaks_rule("fusecsi.engines.embedded")
    assert breaks_rule("fusecsi.engines.embedded.node")
    assert not breaks_rule("fusecsi.rpc.server.Server")
    assert not breaks_rule("fusecsi.engines.base.Launch")
    assert not breaks_rule("fusecsi.engines")
