"""The import rule (docs/contracts.md, "Layout and the import rule"), checked on the source.

Every module of fusecsi/ is read with `ast`, top-level and function-level imports alike,
so a lazy import cannot slip past. A role is a folder; it imports another role only
through the shared layers: the RPC layer, the engine seam and the shared modules named
here. What crosses anyway is named below, each with its reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

import fusecsi

PACKAGE = Path(fusecsi.__file__).parent

ROLES = {
    "fusecsi.cluster.master": "cluster master",
    "fusecsi.cluster.worker": "cluster worker",
    "fusecsi.fuse": "FUSE daemon",
    "fusecsi.mountd": "mountd",
    "fusecsi.csi.controller": "CSI controller",
    "fusecsi.csi.node": "CSI node",
    "fusecsi.dev": "dev tooling",
}
# Any module may import these (and what is inside them).
SHARED = (
    "fusecsi",  # the package itself: its name and version (not what is inside it)
    "fusecsi.rpc",  # the msgpack-RPC layer: the cluster's protocol and mountd's API
    "fusecsi.engines.base",  # the engine seam ...
    "fusecsi.engines",  # ... and its registry (the engine packages themselves are not shared)
    "fusecsi.errors",
    "fusecsi.events",
    "fusecsi.gctune",
    "fusecsi.k8s",
    "fusecsi.locks",
    "fusecsi.logs",
    "fusecsi.metrics",
    "fusecsi.mount_options",
    "fusecsi.tokens",
    "fusecsi.unix_socket",
    "fusecsi.csi.volumes",  # volume ids and the path rules every role applies
    "fusecsi.kubelet_inputs",  # checks of kubelet's volume ids and targets (node, mountd)
)
# Shared within a group of roles: the CSI plumbing by the two CSI roles, the embedded
# cluster's library (its client, write-behind, short-circuit I/O, roles' common code) by
# the cluster's roles, its FUSE daemon and its engine package.
GROUP_SHARED = {
    "fusecsi.csi": ("fusecsi.csi.controller", "fusecsi.csi.node"),
    "fusecsi.cluster": (
        "fusecsi.cluster.master",
        "fusecsi.cluster.worker",
        "fusecsi.fuse",
        "fusecsi.engines.embedded",
    ),
}
# Crossings that are part of the design: (importer prefix, imported prefix) -> why.
ALLOWED = {
    ("fusecsi.__main__", "fusecsi.cli"): "`python -m fusecsi`",
    ("fusecsi.mountd", "fusecsi.fuse.takeover"): "both ends of the takeover handover",
    ("fusecsi.csi.node", "fusecsi.mountd.client"): "mountd's API client (over fusecsi.rpc)",
    ("fusecsi.cluster.shortcircuit", "fusecsi.cluster.worker.store"): (
        "a short-circuit client runs the worker's block-file code on the block files"
    ),
    ("fusecsi.cluster.shortcircuit", "fusecsi.cluster.worker.directio"): "the same",
    ("fusecsi.engines.embedded", "fusecsi.fuse.kernel"): "its FUSE daemon is fusecsi.fuse",
}
# Temporary: delete each line when the crossing is gone (the test then keeps it gone).
TEMPORARY: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.is_dir() or path.with_suffix(".py").is_file()


def imported(path: Path) -> set[str]:
    """The fusecsi modules a file imports (`from fusecsi.csi import volumes` imports
    fusecsi.csi.volumes; `from fusecsi.engines import NAMES` imports fusecsi.engines)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                inner = f"{node.module}.{alias.name}"
                names.add(inner if is_module(inner) else node.module)
    return {name for name in names if name.split(".")[0] == "fusecsi"}


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def owner(name: str) -> str | None:
    """The role or engine package `name` belongs to; None for the shared layers."""
    for role in ROLES:
        if within(name, role):
            return role
    parts = name.split(".")
    if parts[:2] == ["fusecsi", "engines"] and len(parts) > 2 and is_module(".".join(parts[:3])):
        if (PACKAGE / "engines" / parts[2]).is_dir():
            return ".".join(parts[:3])  # an engine's own package
    return None


def allowed(importer: str, name: str, temporary=TEMPORARY) -> bool:
    here, there = owner(importer), owner(name)
    if here == "fusecsi.dev" or (here is not None and here == there):
        return True  # dev tooling may import anything; a role or engine its own modules
    if there is None:  # a shared layer
        if name == "fusecsi" or any(within(name, s) for s in SHARED[1:]):
            return True
        for group, members in GROUP_SHARED.items():
            if within(name, group) and (here in members or within(importer, group)):
                return True
    pairs = [*ALLOWED, *temporary]
    return any(within(importer, a) and within(name, b) for a, b in pairs)


def crossings(temporary=TEMPORARY) -> set[str]:
    return {
        f"{module_name(path)} imports {name}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if "generated" not in path.parts and not path.name.endswith("_pb2.py")
        for name in imported(path)
        if not allowed(module_name(path), name, temporary)
    }


def test_roles_import_each_other_only_through_the_shared_layers():
    assert crossings() == set()


def test_every_temporary_exception_is_still_needed():
    used = {pair for pair in TEMPORARY if crossings(temporary=TEMPORARY - {pair})}
    assert used == TEMPORARY, f"delete from TEMPORARY: {sorted(TEMPORARY - used)}"


def test_every_role_is_a_folder_with_a_main():
    for role in ROLES:
        folder = PACKAGE.parent.joinpath(*role.split("."))
        assert (folder / "main.py").is_file(), role


def test_the_rule_catches_what_it_forbids():
    assert not allowed("fusecsi.mountd.publishing", "fusecsi.cluster.client.ClusterClient")
    assert not allowed("fusecsi.csi.controller.service", "fusecsi.engines.embedded.namespace")
    assert not allowed("fusecsi.csi.controller.service", "fusecsi.mountd.client")
    assert not allowed("fusecsi.mountd.supervisor", "fusecsi.csi.server")
    assert not allowed("fusecsi.fuse.main", "fusecsi.mountd.table")
    assert not allowed("fusecsi.cluster.master.main", "fusecsi.cluster.worker.store")
    assert not allowed("fusecsi.rpc.server", "fusecsi.mountd.api")
    assert allowed("fusecsi.mountd.api", "fusecsi.rpc.server.Server")
    assert allowed("fusecsi.csi.node.service", "fusecsi.engines.base.Cluster")
    assert allowed("fusecsi.csi.node.main", "fusecsi.csi.server.CsiServer")
    assert allowed("fusecsi.fuse.main", "fusecsi.cluster.client.ClusterClient")
    assert allowed("fusecsi.dev.walkthrough", "fusecsi.mountd.client.MountdClient")
