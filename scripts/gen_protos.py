"""Regenerate every language's stubs of proto/clotho/v1: Python, TypeScript and Go.

Usage: python scripts/gen_protos.py [--out DIR] [--lang python|typescript|go ...]

- Python (grpcio-tools' protoc) into clients/python: the package path matches the
  proto package (clotho/v1), so the generated imports (`from clotho.v1 import x_pb2`)
  work without rewriting.
- TypeScript (protoc-gen-es 2, services included, ESM `.js` imports) into
  clients/typescript/src/gen/clotho/v1/*_pb.ts.
- Go (protoc-gen-go + protoc-gen-go-grpc) into clients/go/gen/clotho/v1 (package
  clothov1, the `go_package` the protos name).

TypeScript and Go go through `buf generate` with local plugins only (no remote plugins:
no network): buf from the test extras, protoc-gen-es from clients/typescript's
node_modules (`npm ci` there), the Go plugins from Debian (`make setup-clients`).
With `--out DIR` everything lands under DIR with the same relative paths (the
freshness test compares that with the checked-in files).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
DEFAULT_OUT = ROOT / "clients" / "python"
LANGUAGES = ("python", "typescript", "go")
# Where each language's generated files live, relative to the repository root.
TS_GEN = Path("clients/typescript/src/gen")
GO_GEN = Path("clients/go/gen")


class MissingToolchain(RuntimeError):
    """A plugin or buf is not installed (run `make setup-clients`)."""


def generate(out: Path) -> list[Path]:
    """The Python stubs, into `out` (clients/python by default)."""
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


def buf_binary() -> str:
    found = shutil.which("buf") or str(Path(sys.executable).parent / "buf")
    if not Path(found).exists():
        raise MissingToolchain("buf is not installed; it comes with the test extras (buf-bin)")
    return found


def plugin(name: str, where: Path | None = None) -> str:
    """The absolute path of a local protoc plugin."""
    found = str(where / name) if where is not None and (where / name).exists() else shutil.which(name)
    if not found:
        hint = "run `npm ci` in clients/typescript" if where is not None else "run `make setup-clients`"
        raise MissingToolchain(f"protoc plugin {name} is not installed: {hint}")
    return str(Path(found).resolve()) if where is not None else found


def _buf_generate(plugins: list[dict], out_dir: Path) -> None:
    """`buf generate` of proto/ with `plugins` (local only), every `out` under out_dir."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    template = {"version": "v2", "plugins": [{**p, "out": str(out_dir)} for p in plugins]}
    result = subprocess.run(
        [buf_binary(), "generate", "proto", "--template", json.dumps(template)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if result.returncode != 0:
        raise SystemExit(f"buf generate failed:\n{result.stdout}{result.stderr}")


def generate_typescript(root: Path = ROOT) -> list[Path]:
    """The TypeScript stubs, into root/clients/typescript/src/gen."""
    es = plugin("protoc-gen-es", ROOT / "clients" / "typescript" / "node_modules" / ".bin")
    out_dir = root / TS_GEN
    _buf_generate([{"local": es, "opt": ["target=ts", "import_extension=js"], "include_imports": False}], out_dir)
    return sorted(out_dir.rglob("*.ts"))


def generate_go(root: Path = ROOT) -> list[Path]:
    """The Go stubs, into root/clients/go/gen (one folder per proto package)."""
    go, go_grpc = plugin("protoc-gen-go"), plugin("protoc-gen-go-grpc")
    out_dir = root / GO_GEN
    _buf_generate(
        [
            {"local": go, "opt": ["paths=source_relative"]},
            {"local": go_grpc, "opt": ["paths=source_relative"]},
        ],
        out_dir,
    )
    return sorted(out_dir.rglob("*.go"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write under DIR instead of the repository")
    parser.add_argument("--lang", action="append", choices=LANGUAGES, help="only these languages (repeatable)")
    args = parser.parse_args()
    root = args.out if args.out is not None else ROOT
    counts = {}
    for lang in args.lang or LANGUAGES:
        if lang == "python":
            out = args.out / "clients" / "python" if args.out is not None else DEFAULT_OUT
            out.mkdir(parents=True, exist_ok=True)
            counts[lang] = len(generate(out))
        elif lang == "typescript":
            counts[lang] = len(generate_typescript(root))
        else:
            counts[lang] = len(generate_go(root))
    print("generated " + ", ".join(f"{n} {lang} files" for lang, n in counts.items()), file=sys.stderr)


if __name__ == "__main__":
    main()
