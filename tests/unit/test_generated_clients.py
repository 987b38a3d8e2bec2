"""The checked-in TypeScript and Go stubs are what scripts/gen_protos.py makes from
proto/ (the Python stubs: test_generated_stubs.py), and each client's own test suite
passes (go vet + go test; tsc strict + node --test). Without a toolchain these skip,
except with CI=true, where they fail."""

from __future__ import annotations

import filecmp
import importlib.util
import subprocess
from pathlib import Path
from typing import Any

import pytest
from client_toolchains import GO_DIR, GO_FLAGS, ROOT, TS_DIR, go_env, require_go, require_node, ts_build


def _load_generator() -> Any:
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compare(fresh: Path, checked_in: Path) -> None:
    fresh_names = sorted(str(p.relative_to(fresh)) for p in fresh.rglob("*") if p.is_file())
    checked_names = sorted(str(p.relative_to(checked_in)) for p in checked_in.rglob("*") if p.is_file())
    assert fresh_names == checked_names, "generated files differ: run `python scripts/gen_protos.py`"
    stale = [n for n in fresh_names if not filecmp.cmp(fresh / n, checked_in / n, shallow=False)]
    assert not stale, f"stale generated code {stale}: run `python scripts/gen_protos.py` and commit"


def _generate(lang: str, root: Path) -> None:
    gen = _load_generator()
    try:
        (gen.generate_typescript if lang == "typescript" else gen.generate_go)(root)
    except gen.MissingToolchain as exc:
        from client_toolchains import missing

        missing(str(exc))


@pytest.mark.timeout(300)
def test_typescript_stubs_match_protos(tmp_path: Path) -> None:
    require_node()
    _generate("typescript", tmp_path)
    gen = _load_generator()
    _compare(tmp_path / gen.TS_GEN, ROOT / gen.TS_GEN)


@pytest.mark.timeout(300)
def test_go_stubs_match_protos(tmp_path: Path) -> None:
    require_go()
    _generate("go", tmp_path)
    gen = _load_generator()
    _compare(tmp_path / gen.GO_GEN, ROOT / gen.GO_GEN)


@pytest.mark.timeout(300)
def test_a_proto_edit_makes_every_language_stale(tmp_path: Path) -> None:
    """Guards against a vacuous comparison: an added field changes each output."""
    require_go()
    require_node()
    gen = _load_generator()
    proto_copy = tmp_path / "proto"
    import shutil

    shutil.copytree(ROOT / "proto", proto_copy)
    edited = proto_copy / "clotho" / "v1" / "policy.proto"
    edited.write_text(
        edited.read_text().replace(
            "double committed_at = 2;", "double committed_at = 2;\n  // Extra.\n  string extra = 4;"
        )
    )
    # buf reads proto/ relative to ROOT: run the generator from a copy of the layout.
    gen.ROOT = tmp_path
    (tmp_path / "clients" / "typescript").mkdir(parents=True)
    (tmp_path / "clients" / "typescript" / "node_modules").symlink_to(TS_DIR / "node_modules")
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    gen.generate_typescript(tmp_path)
    gen.generate_go(tmp_path)
    assert not filecmp.cmp(
        tmp_path / gen.TS_GEN / "clotho/v1/policy_pb.ts", ROOT / gen.TS_GEN / "clotho/v1/policy_pb.ts", shallow=False
    )
    assert not filecmp.cmp(
        tmp_path / gen.GO_GEN / "clotho/v1/policy.pb.go", ROOT / gen.GO_GEN / "clotho/v1/policy.pb.go", shallow=False
    )


@pytest.mark.timeout(600)
def test_go_client_vets_and_passes_its_tests() -> None:
    go = require_go()
    for args in (["vet", *GO_FLAGS, "./..."], ["test", *GO_FLAGS, "./..."]):
        result = subprocess.run([go, *args], cwd=GO_DIR, env=go_env(), capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"go {args[0]}:\n{result.stdout}{result.stderr}"


@pytest.mark.timeout(600)
def test_typescript_client_typechecks_and_passes_its_tests() -> None:
    node = require_node()
    dist = ts_build()
    tests = sorted(str(p) for p in (dist / "test").glob("*.test.js"))
    assert tests
    result = subprocess.run([node, "--test", *tests], cwd=TS_DIR, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
