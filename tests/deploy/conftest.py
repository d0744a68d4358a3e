"""Session fixtures of the deployment tests (helpers in tests/support/helm.py)."""

from __future__ import annotations

import pytest
import yaml
from support.helm import VALUES_ALL, render, run_helm


@pytest.fixture(scope="session")
def helm_version() -> str:
    return run_helm("version", "--short").stdout.strip()


@pytest.fixture(scope="session")
def default_docs(helm_version) -> list[dict]:
    return render()


@pytest.fixture(scope="session")
def all_docs(helm_version) -> list[dict]:
    return render(VALUES_ALL)


@pytest.fixture(scope="session")
def values_all() -> dict:
    return yaml.safe_load(VALUES_ALL.read_text())


@pytest.fixture(scope="session")
def renders(default_docs, all_docs) -> dict[str, list[dict]]:
    return {"defaults": default_docs, "all-options": all_docs}
