#!/usr/bin/env python3
"""Facts from Curvine's own sources that the engine must agree with, kept as JSON.

`curvine_upstream.json` holds, for the upstream commit it names, the descriptors of every
message and enum our proto/curvine/*.proto declare (field name, number, type, label, type
name, default) and the long flags of `curvine-fuse` (its FuseMountArgs). It is made from
Curvine's .proto files compiled by protoc — read from a checkout or a bare git directory
of CurvineIO/curvine named by $FUSECSI_CURVINE_UPSTREAM, never committed — so that the
always-running test can compare our descriptors without network access.

    python tests/engines/curvine/curvine_upstream.py --write   # at the upstream's HEAD
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2

HERE = Path(__file__).resolve().parent
DATA = HERE / "curvine_upstream.json"
ENV = "FUSECSI_CURVINE_UPSTREAM"
# where a session's `fetch` of github:CurvineIO/curvine puts its bare git directory
DEFAULT_LOCATIONS = ("/work/.mirror/CurvineIO+curvine/repo",)
PROTO_DIR = "crates/common/curvine-proto/proto"
PROTO_FILES = ("common.proto", "master.proto")
MOUNT_ARGS = "curvine-fuse/src/cli/mount_args.rs"

Label = descriptor_pb2.FieldDescriptorProto.Label
Type = descriptor_pb2.FieldDescriptorProto.Type


def describe(files: list[descriptor_pb2.FileDescriptorProto]) -> tuple[dict, dict]:
    """(messages, enums) by full name, with the facts compared field by field."""
    messages: dict[str, dict] = {}
    enums: dict[str, dict] = {}

    def walk(prefix: str, message: descriptor_pb2.DescriptorProto) -> None:
        name = f"{prefix}.{message.name}"
        messages[name] = {
            field.name: {
                "number": field.number,
                "label": Label.Name(field.label),
                "type": Type.Name(field.type),
                "type_name": field.type_name,
                "default": field.default_value,
            }
            for field in message.field
        }
        for nested in message.nested_type:
            walk(name, nested)
        for enum in message.enum_type:
            enums[f"{name}.{enum.name}"] = {v.name: v.number for v in enum.value}

    for file in files:
        for message in file.message_type:
            walk(file.package, message)
        for enum in file.enum_type:
            enums[f"{file.package}.{enum.name}"] = {v.name: v.number for v in enum.value}
    return messages, enums


def ours() -> tuple[dict, dict]:
    from fusecsi.engines.curvine import common_pb2, master_pb2

    files = []
    for module in (common_pb2, master_pb2):
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        files.append(proto)
    return describe(files)


def locate() -> Path | None:
    for candidate in (os.environ.get(ENV), *DEFAULT_LOCATIONS):
        if candidate and Path(candidate).exists():
            return Path(candidate)
    return None


def read_upstream(root: Path, commit: str | None) -> tuple[str, dict[str, str]]:
    """(commit, {path: text}) from a checkout or a bare git directory."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", f"--git-dir={git_dir}", *args], check=True, capture_output=True, text=True
        ).stdout

    git_dir = root / ".git" if (root / ".git").exists() else root
    commit = commit or git("rev-parse", "HEAD").strip()
    paths = [f"{PROTO_DIR}/{name}" for name in PROTO_FILES] + [MOUNT_ARGS]
    return commit, {path: git("show", f"{commit}:{path}") for path in paths}


def compile_protos(texts: dict[str, str]) -> list[descriptor_pb2.FileDescriptorProto]:
    with tempfile.TemporaryDirectory() as tmp:
        for name in PROTO_FILES:
            (Path(tmp) / name).write_text(texts[f"{PROTO_DIR}/{name}"])
        out = Path(tmp) / "set.pb"
        result = subprocess.run(
            [sys.executable, "-m", "grpc_tools.protoc", f"-I{tmp}", f"--descriptor_set_out={out}",
             *PROTO_FILES],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"protoc on Curvine's protos failed: {result.stderr.strip()}")
        descriptor_set = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    return list(descriptor_set.file)


def fuse_flags(mount_args: str) -> list[str]:
    """The long flags of curvine-fuse's FuseMountArgs (clap: field name in kebab-case)."""
    body = mount_args.split("pub struct FuseMountArgs", 1)[1].split("\n}", 1)[0]
    names = re.findall(r"^\s*(?:pub\s+)?([a-z_][a-z0-9_]*)\s*:", body, re.MULTILINE)
    return sorted(name.replace("_", "-") for name in names)


def extract(root: Path, commit: str | None = None) -> dict:
    commit, texts = read_upstream(root, commit)
    messages, enums = describe(compile_protos(texts))
    our_messages, our_enums = ours()
    return {
        "upstream": "github.com/CurvineIO/curvine",
        "commit": commit,
        "files": [f"{PROTO_DIR}/{name}" for name in PROTO_FILES] + [MOUNT_ARGS],
        # only what our protos declare (and the map entries inside them)
        "messages": {name: messages[name] for name in sorted(our_messages) if name in messages},
        "enums": {name: enums[name] for name in sorted(our_enums) if name in enums},
        "fuse_flags": fuse_flags(texts[MOUNT_ARGS]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"rewrite {DATA.name}")
    parser.add_argument("--commit", help="upstream commit (default: the upstream's HEAD)")
    args = parser.parse_args()
    root = locate()
    if root is None:
        raise SystemExit(f"set {ENV} to a checkout or git directory of CurvineIO/curvine")
    text = json.dumps(extract(root, args.commit), indent=1, sort_keys=True) + "\n"
    if args.write:
        DATA.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
