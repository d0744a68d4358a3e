"""The flags the chart passes to each fusecsi role: exactly those of the contract
(docs/contracts.md, "Role flags"), and each one accepted by the real `fusecsi ROLE --help`."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from support.helm import REPO, contract_flags, flags_of, fusecsi_roles

from fusecsi.cli import COMMANDS

CHART_ROLES = ["controller", "node", "mountd", "master", "worker"]


@pytest.fixture(scope="module")
def role_args(default_docs, all_docs) -> dict[str, list[list[str]]]:
    """Each role's args under both renders."""
    found: dict[str, list[list[str]]] = {}
    for docs in (default_docs, all_docs):
        for role, args in fusecsi_roles(docs).items():
            found.setdefault(role, []).append(args)
    return found


def test_the_chart_runs_these_roles(role_args):
    assert sorted(role_args) == sorted(CHART_ROLES)
    assert set(CHART_ROLES) <= set(COMMANDS)  # subcommands of the image's entrypoint


@pytest.mark.parametrize("role", CHART_ROLES)
def test_flags_are_the_contract_flags(role_args, role):
    allowed = contract_flags()[role]
    for args in role_args[role]:
        assert flags_of(args) <= allowed, f"{role}: {flags_of(args) - allowed} not in contracts"
        # every flag takes a value given as the next argument
        for index, arg in enumerate(args):
            if arg.startswith("--"):
                assert "=" not in arg and not args[index + 1].startswith("--"), (role, arg)
    # the all-options render passes every flag of the role's contract row that the chart uses
    used = set().union(*(flags_of(args) for args in role_args[role]))
    assert "--metrics-address" in used


@pytest.mark.parametrize("role", CHART_ROLES)
def test_role_help_accepts_every_flag_the_chart_passes(role_args, role):
    proc = subprocess.run(
        [sys.executable, "-m", "fusecsi", role, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert proc.returncode == 0, f"fusecsi {role} --help failed: {proc.stderr.strip()}"
    offered = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", proc.stdout))
    needed = set().union(*(flags_of(args) for args in role_args[role]))
    assert needed <= offered, f"fusecsi {role} lacks {sorted(needed - offered)}"
