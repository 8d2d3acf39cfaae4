"""Regenerate the Python code for `proto/*.proto`.

Usage::

    python -m proto.generate            # rewrite proto/*_pb2*.py(i) in place
    python -m proto.generate --out DIR  # write to DIR instead (the test compares the two)

The output depends on the grpcio-tools version, which pyproject pins in the `dev` extra.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
REPO_ROOT = PROTO_DIR.parent


def generate(out_dir: Path) -> list[Path]:
    """Compile every `.proto` in `proto/` into `out_dir/proto/` and return the written files."""
    from grpc_tools import protoc  # dev dependency, imported lazily

    out_dir.mkdir(parents=True, exist_ok=True)
    sources = sorted(p.relative_to(REPO_ROOT).as_posix() for p in PROTO_DIR.glob("*.proto"))
    args = [
        "grpc_tools.protoc",
        f"-I{REPO_ROOT}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed for {sources}")
    return sorted((out_dir / "proto").glob("*_pb2*"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=REPO_ROOT, help="root to write proto/ under")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
