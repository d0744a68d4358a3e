"""Every subcommand's argument and start-up errors: one line naming what is wrong, no
traceback; exit 2 for usage, 1 for runtime. Real processes, real sockets, a real dead mount."""

from __future__ import annotations

import ctypes
import json
import os
import socket
import subprocess
import sys

import pytest


def fusecsi(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fusecsi", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


USAGE = [
    (
        ["mount", "--master-addrs", "foo:bar", "--fs-path", "/", "/tmp"],
        "fusecsi mount: --master-addrs: master address 'foo:bar': port must be 1-65535",
    ),
    (
        ["fs", "--master-addrs", "foo:bar", "ls", "/"],
        "fusecsi fs: --master-addrs: master address 'foo:bar': port must be 1-65535",
    ),
    (
        ["worker", "--data-dir", "/tmp/x", "--master-addrs", "a:99999"],
        "fusecsi worker: --master-addrs: master address 'a:99999': port must be 1-65535",
    ),
    (
        ["controller", "--endpoint", "tcp://10.0.0.1:5000"],
        "fusecsi controller: --endpoint: unsupported endpoint 'tcp://10.0.0.1:5000': "
        "only unix:// sockets are served",
    ),
    (
        ["node", "--node-id", "n", "--endpoint", "tcp://x"],
        "fusecsi node: --endpoint: unsupported endpoint 'tcp://x': only unix:// sockets are served",
    ),
    (
        ["mountd", "--socket", "http://x"],
        "fusecsi mountd: --socket: unsupported endpoint 'http://x': only unix:// sockets are served",
    ),
    (
        ["master", "--data-dir", "/tmp/x", "--listen", "foo:bar"],
        "fusecsi master: --listen: address 'foo:bar': port must be 0-65535",
    ),
    (
        ["controller", "--metrics-address", "nowhere"],
        "fusecsi controller: --metrics-address: metrics address 'nowhere' is not HOST:PORT",
    ),
    (
        ["mount", "--master-addrs", "a:1", "--fs-path", "/", "/no/such/dir"],
        "fusecsi mount: mountpoint /no/such/dir does not exist",
    ),
    (
        ["mount", "--master-addrs", "a:1", "--fs-path", "/", "/etc/hostname"],
        "fusecsi mount: mountpoint /etc/hostname is not a directory",
    ),
    (["mount", "--master-addrs", "a:1"], "fusecsi mount: the following arguments are required: "),
]


@pytest.mark.parametrize(("args", "message"), USAGE, ids=[" ".join(a[:3]) for a, _ in USAGE])
def test_usage_errors_are_one_line_exit_2(args, message):
    proc = fusecsi(*args)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.splitlines()
    role = args[0]
    assert line.startswith(message) and line.endswith(f"(see fusecsi {role} --help)"), line


@pytest.mark.parametrize("role", ["master", "worker"])
def test_port_in_use_names_the_address(role, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        extra = ["--master-addrs", "127.0.0.1:1"] if role == "worker" else []
        proc = fusecsi(role, "--data-dir", str(tmp_path), "--listen", address, *extra)
    assert proc.returncode == 1
    lines = [json.loads(line) for line in proc.stderr.splitlines()]  # JSON lines only
    assert lines[-1]["level"] == "error"
    assert lines[-1]["msg"] == (
        f"fusecsi {role}: EADDRINUSE: cannot listen on {address}: Address already in use"
    )


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (
            ["--data-dir", "/proc/no-such-dir"],
            1,
            "/proc/no-such-dir: ENOENT: No such file or directory",
        ),
        (["--data-dir", "/tmp/x", "--token-file", "/etc"], 2, "/etc: EISDIR: Is a directory"),
    ],
)
def test_start_up_errors_name_the_path(args, code, message):
    proc = fusecsi("master", *args)
    assert proc.returncode == code
    (line,) = proc.stderr.splitlines()
    assert json.loads(line)["msg"] == f"fusecsi master: {message}"


def test_a_dead_fuse_mount_is_not_a_missing_mountpoint(tmp_path):
    target = tmp_path / "dead"
    target.mkdir()
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open("/dev/fuse", os.O_RDWR)
    options = f"fd={fd},rootmode=40000,user_id=0,group_id=0".encode()
    assert libc.mount(b"deadtest", str(target).encode(), b"fuse.deadtest", 0, options) == 0
    os.close(fd)  # nobody serves it any more: ENOTCONN
    try:
        proc = fusecsi("mount", "--master-addrs", "a:1", "--fs-path", "/", str(target))
    finally:
        libc.umount2(str(target).encode(), 2)  # MNT_DETACH
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        f"fusecsi mount: ENOTCONN: mountpoint {target} is a dead FUSE mount: unmount it (umount -l)"
    ]


def test_warnings_become_json_lines_in_a_role_log():
    code = (
        "import warnings, urllib3\n"
        "from fusecsi import logs\n"
        "logs.setup('controller')\n"
        "warnings.warn('Unverified HTTPS request', urllib3.exceptions.InsecureRequestWarning)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    (line,) = proc.stderr.splitlines()
    record = json.loads(line)
    assert record["level"] == "warning" and "InsecureRequestWarning" in record["msg"]


def test_fs_on_a_wrong_address_says_why():
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        refused = f"127.0.0.1:{closed.getsockname()[1]}"  # bound, not listening: refused
        proc = fusecsi("fs", "--master-addrs", refused, "ls", "/")
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        f"fusecsi fs ls: ECONNREFUSED: no master answered resolve: "
        f"cannot connect to {refused}: connection refused"
    ]


def test_mount_on_a_refusing_address_logs_one_json_line(tmp_path):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        refused = f"127.0.0.1:{closed.getsockname()[1]}"
        proc = fusecsi("mount", "--master-addrs", refused, "--fs-path", "/", str(tmp_path))
    assert proc.returncode == 1
    (line,) = proc.stderr.splitlines()
    assert json.loads(line)["err"] == (
        f"ECONNREFUSED: no master answered resolve: cannot connect to {refused}: connection refused"
    )
