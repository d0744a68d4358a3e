"""The cluster token: one loader, one rule, for every role that takes `--token-file`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fusecsi.tokens import TOKEN_ENV, load_token


def test_a_token_file_wins_over_the_environment(tmp_path, monkeypatch):
    path = tmp_path / "token"
    path.write_text("  from-file\n")
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    assert load_token(str(path)) == "from-file"
    assert load_token(None) == "from-env"
    monkeypatch.setenv(TOKEN_ENV, "")
    assert load_token(None) is None


def test_an_empty_token_file_is_an_error(tmp_path):
    path = tmp_path / "token"
    path.write_text("\n")
    with pytest.raises(ValueError, match=f"^token file {path} is empty$"):
        load_token(str(path))


@pytest.mark.parametrize(
    "role",
    [
        ["fs", "--master-addrs", "127.0.0.1:1", "ls", "/"],
        ["mount", "--master-addrs", "127.0.0.1:1", "--fs-path", "/", "{tmp}"],
        ["controller", "--endpoint", "unix://{tmp}/csi.sock"],
        ["master", "--data-dir", "{tmp}/data"],
        ["worker", "--data-dir", "{tmp}/data", "--master-addrs", "127.0.0.1:1"],
    ],
    ids=lambda role: role[0],
)
def test_every_role_refuses_an_empty_token_file_in_one_line(tmp_path, role):
    empty = tmp_path / "token"
    empty.write_text("")
    args = [a.replace("{tmp}", str(tmp_path)) for a in role]
    args[1:1] = ["--token-file", str(empty)]
    done = subprocess.run(
        [sys.executable, "-m", "fusecsi", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    (line,) = done.stderr.strip().splitlines()
    if line.startswith("{"):  # roles that log JSON say it as their last JSON line
        record = json.loads(line)
        line = f"{record['msg']}: {record.get('err', '')}"
    assert f"token file {empty} is empty" in line
