"""The checked-in clotho.v1 stubs are what scripts/gen_protos.py makes from proto/."""

from __future__ import annotations

import filecmp
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHECKED_IN = ROOT / "clients" / "python" / "clotho" / "v1"


def _load_generator() -> Any:
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stubs_match_protos(tmp_path: Path) -> None:
    _load_generator().generate(tmp_path)
    fresh = tmp_path / "clotho" / "v1"
    fresh_names = sorted(p.name for p in fresh.iterdir() if p.is_file())
    checked_names = sorted(p.name for p in CHECKED_IN.iterdir() if p.is_file() and p.suffix in (".py", ".pyi"))
    assert fresh_names == checked_names, "stub files differ: run `python scripts/gen_protos.py`"
    stale = [n for n in fresh_names if not filecmp.cmp(fresh / n, CHECKED_IN / n, shallow=False)]
    assert not stale, f"stale generated stubs {stale}: run `python scripts/gen_protos.py` and commit"


def test_stale_check_detects_a_proto_edit(tmp_path: Path) -> None:
    """The comparison above would notice a changed proto (guards against a vacuous check)."""
    gen = _load_generator()
    proto_copy = tmp_path / "proto"
    shutil.copytree(ROOT / "proto", proto_copy)
    edited = proto_copy / "clotho" / "v1" / "policy.proto"
    edited.write_text(
        edited.read_text().replace(
            "double committed_at = 2;", "double committed_at = 2;\n  // Extra.\n  string extra = 4;"
        )
    )
    gen.PROTO_ROOT = proto_copy
    out = tmp_path / "out"
    out.mkdir()
    gen.generate(out)
    assert not filecmp.cmp(out / "clotho" / "v1" / "policy_pb2.py", CHECKED_IN / "policy_pb2.py", shallow=False)


def test_buf_lint_passes() -> None:
    buf = shutil.which("buf") or str(Path(sys.executable).parent / "buf")
    if not Path(buf).exists():
        pytest.fail("buf is not installed; it comes with the test extras (buf-bin)")
    result = subprocess.run([buf, "lint"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
