"""Regenerate the Python stubs of proto/clotho/v1 into clients/python.

Usage: python scripts/gen_protos.py [--out DIR]

The output lands in a package whose path matches the proto package (clotho/v1), so the
generated imports (`from clotho.v1 import x_pb2`) work without rewriting.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
DEFAULT_OUT = ROOT / "clients" / "python"


def generate(out: Path) -> list[Path]:
    protos = sorted(PROTO_ROOT.glob("clotho/v1/*.proto"))
    include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *[str(p.relative_to(PROTO_ROOT)) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    init = out / "clotho" / "v1" / "__init__.py"
    init.write_text('"""Generated clotho.v1 stubs (scripts/gen_protos.py). Do not edit."""\n')
    return sorted((out / "clotho" / "v1").iterdir())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    generated = generate(parser.parse_args().out)
    print(f"generated {len(generated)} files", file=sys.stderr)


if __name__ == "__main__":
    main()
