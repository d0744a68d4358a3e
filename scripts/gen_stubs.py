#!/usr/bin/env python3
"""Regenerate the CSI protobuf and grpclib stubs in fusecsi/csi/generated/ from proto/csi.proto.

protoc sees the proto under the virtual path fusecsi/csi/generated/csi.proto, so the generated
files land in fusecsi/csi/generated/ and the grpclib module imports
`fusecsi.csi.generated.csi_pb2`.
`--out DIR` writes the same tree under DIR instead of the repo root (the freshness
test compares that output with the committed files).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROTO_DIR = REPO / "proto"
PACKAGE = "fusecsi/csi/generated"
GENERATED = ("csi_pb2.py", "csi_pb2.pyi", "csi_grpc.py")


def grpclib_plugin() -> Path:
    """The grpclib plugin installed next to the running interpreter (the venv's)."""
    plugin = Path(sys.executable).parent / "protoc-gen-grpclib_python"
    if not plugin.exists():
        raise SystemExit(f"gen_stubs: {plugin} not found; install grpclib into this venv")
    return plugin


def protoc_command(out: Path) -> list[str]:
    import grpc_tools

    wkt_include = Path(grpc_tools.__file__).parent / "_proto"
    return [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PACKAGE}={PROTO_DIR}",
        f"-I{wkt_include}",
        f"--plugin=protoc-gen-grpclib_python={grpclib_plugin()}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpclib_python_out={out}",
        f"{PACKAGE}/csi.proto",
    ]


def generate(out: Path) -> list[Path]:
    """Run protoc into `out`; return the generated files."""
    target = out / PACKAGE
    target.mkdir(parents=True, exist_ok=True)
    # protoc resolves the virtual include against the proto dir; run from the repo
    # so relative paths in its messages stay short.
    result = subprocess.run(
        protoc_command(out), cwd=REPO, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise SystemExit(f"gen_stubs: protoc failed:\n{result.stderr.strip()}")
    init = target / "__init__.py"
    if not init.exists():
        init.write_text('"""Generated CSI v1 stubs (see scripts/gen_stubs.py)."""\n')
    files = [target / name for name in GENERATED]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise SystemExit(f"gen_stubs: protoc did not produce {', '.join(missing)}")
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO,
        help="root to write fusecsi/csi/generated/ under (default: repo)",
    )
    args = parser.parse_args(argv)
    for path in generate(args.out.resolve()):
        print(os.path.relpath(path, Path.cwd()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
