"""The import rules of pyproject.toml's [tool.importlinter] hold on this tree, and each
contract would catch the import it forbids (checked on a copy of the tree with one bad
import added, so that a contract that matched nothing could not pass here)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TRAJECTORY = ROOT / "services" / "gateway" / "trajectory"

# id -> the name lint-imports prints (KEPT / BROKEN after it).
CONTRACTS = {
    c["id"]: c["name"]
    for c in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
}


def test_the_three_rules_are_configured() -> None:
    assert set(CONTRACTS) == {"services-independent", "trajectory-no-web-or-rpc", "no-clients-imports"}


def _lint_imports(cwd: Path, *contracts: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if exe is None:
        pytest.fail("lint-imports is not installed; it comes with the test extras (import-linter)")
    args = [exe, "--no-cache", "--no-logo", *(f"--contract={c}" for c in contracts)]
    # The package under test is the one in `cwd` (lint-imports puts cwd first on sys.path).
    env = {"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(cwd), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _assert_kept(result: subprocess.CompletedProcess[str], contract: str) -> None:
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert f"{contract} KEPT" in " ".join(out.split()), out


def _assert_broken(result: subprocess.CompletedProcess[str], contract: str) -> None:
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert f"{contract} BROKEN" in " ".join(out.split()), out


def test_services_never_import_each_other() -> None:
    _assert_kept(_lint_imports(ROOT, "services-independent"), CONTRACTS["services-independent"])


def test_generated_code_is_imported_only_as_clotho_v1() -> None:
    _assert_kept(_lint_imports(ROOT, "no-clients-imports"), CONTRACTS["no-clients-imports"])


def test_trajectory_store_imports_no_web_framework_or_grpc() -> None:
    if not (TRAJECTORY / "__init__.py").is_file():
        pytest.fail(
            "services/gateway/trajectory/ (a package) is missing, but the import contract "
            "'trajectory-no-web-or-rpc' in pyproject.toml names it: the trajectory store and batch "
            "assembly live there (docs/architecture.md)"
        )
    _assert_kept(_lint_imports(ROOT, "trajectory-no-web-or-rpc"), CONTRACTS["trajectory-no-web-or-rpc"])


def test_all_contracts_together() -> None:
    """What `make lint` runs: every contract of the configuration, none skipped."""
    if not (TRAJECTORY / "__init__.py").is_file():
        pytest.fail(
            "services/gateway/trajectory/ is missing (see test_trajectory_store_imports_no_web_framework_or_grpc)"
        )
    result = _lint_imports(ROOT)
    out = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 0, out
    assert f"Contracts: {len(CONTRACTS)} kept, 0 broken." in out, out


# --- Each contract catches what it forbids -------------------------------------------------


@pytest.fixture
def tree_copy(tmp_path: Path) -> Path:
    """The packages the contracts read, and the configuration, copied to tmp_path."""
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.pyc")
    for name in ("services", "tests", "bench"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=ignore)
    shutil.copy2(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def _add_module(root: Path, dotted: str, source: str) -> None:
    path = root.joinpath(*dotted.split(".")).with_suffix(".py")
    path.parent.mkdir(parents=True, exist_ok=True)
    for parent in path.relative_to(root).parents:
        if parent.parts and parent.parts[0] == "services":
            (root / parent / "__init__.py").touch()
    path.write_text(source)


def test_the_copy_is_what_gets_checked(tree_copy: Path) -> None:
    """The bad-import checks below read the copy, not the installed tree."""
    _add_module(tree_copy, "services.gateway.contract_probe", "import services.trainer\n")
    _assert_broken(_lint_imports(tree_copy, "services-independent"), CONTRACTS["services-independent"])
    _assert_kept(_lint_imports(ROOT, "services-independent"), CONTRACTS["services-independent"])


@pytest.mark.parametrize(
    ("importer", "imported"),
    [
        ("services.gateway", "services.inference"),
        ("services.inference", "services.trainer"),
        ("services.trainer", "services.gateway"),
        ("services.demo", "services.trainer"),
    ],
)
def test_a_service_importing_another_breaks_the_contract(tree_copy: Path, importer: str, imported: str) -> None:
    # Indirect too: the forbidden import sits in a helper module of the importing service.
    _add_module(tree_copy, f"{importer}.contract_probe", f"from {imported} import settings\n")
    _assert_broken(_lint_imports(tree_copy, "services-independent"), CONTRACTS["services-independent"])


@pytest.mark.parametrize("forbidden", ["fastapi", "starlette.requests", "uvicorn", "grpc", "grpc.aio"])
def test_a_web_or_grpc_import_in_the_trajectory_store_breaks_the_contract(tree_copy: Path, forbidden: str) -> None:
    _add_module(tree_copy, "services.gateway.trajectory.contract_probe", f"import {forbidden}\n")
    _assert_broken(_lint_imports(tree_copy, "trajectory-no-web-or-rpc"), CONTRACTS["trajectory-no-web-or-rpc"])


def test_the_trajectory_store_may_import_the_standard_library(tree_copy: Path) -> None:
    _add_module(tree_copy, "services.gateway.trajectory.contract_probe", "import sqlite3\nimport asyncio\n")
    _assert_kept(_lint_imports(tree_copy, "trajectory-no-web-or-rpc"), CONTRACTS["trajectory-no-web-or-rpc"])


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("services.gateway.contract_probe", "from clients.python.clotho.v1 import policy_pb2\n"),
        ("tests.unit.contract_probe", "import clients.python.clotho.client\n"),
    ],
)
def test_importing_generated_code_via_clients_breaks_the_contract(tree_copy: Path, module: str, source: str) -> None:
    _add_module(tree_copy, module, source)
    _assert_broken(_lint_imports(tree_copy, "no-clients-imports"), CONTRACTS["no-clients-imports"])
