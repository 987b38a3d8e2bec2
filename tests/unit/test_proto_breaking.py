"""`buf breaking` (FILE rules, buf.yaml) passes for proto/ against the proto/ before its last
change, and would fail on a breaking edit (a removed field, a renumbered field)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _buf() -> str:
    buf = shutil.which("buf", path=str(Path(sys.executable).parent)) or shutil.which("buf")
    if buf is None:
        pytest.fail("buf is not installed; it comes with the test extras (buf-bin)")
    return buf


def _git(*args: str) -> subprocess.CompletedProcess[str]:
    git = shutil.which("git")
    if git is None:
        pytest.fail("git is needed to compare proto/ with the previous commit")
    return subprocess.run([git, *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


def previous_ref() -> str:
    """The ref scripts/breaking_ref.sh names (as `make lint` uses it): the parent of the last
    commit that changed proto/ (first-parent history), HEAD's while proto/ has uncommitted
    changes, or HEAD when there is no parent."""
    if _git("rev-parse", "--is-inside-work-tree").stdout.strip() != "true":
        pytest.fail(f"{ROOT} is not a git checkout: `buf breaking` compares proto/ with the previous commit")
    result = subprocess.run(
        ["sh", str(ROOT / "scripts" / "breaking_ref.sh")], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and result.stdout.strip(), result.stderr
    return result.stdout.strip()


def _breaking(input_dir: Path, against: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_buf(), "breaking", str(input_dir), "--against", against],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_protos_are_compatible_with_the_previous_commit() -> None:
    ref = previous_ref()
    # As deep as the history (buf clones 50 commits unless told; the ref may be further back).
    depth = _git("rev-list", "--count", "HEAD").stdout.strip() or "50"
    result = _breaking(Path("proto"), f".git#ref={ref},subdir=proto,depth={depth}", ROOT)
    assert result.returncode == 0, f"buf breaking against {ref}:\n{result.stdout}{result.stderr}"


@pytest.fixture
def proto_copy(tmp_path: Path) -> Path:
    """proto/ and buf.yaml copied, to be edited; buf runs in tmp_path."""
    shutil.copytree(ROOT / "proto", tmp_path / "proto")
    shutil.copy2(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    return tmp_path


def _edit(root: Path, old: str, new: str) -> None:
    path = root / "proto" / "clotho" / "v1" / "policy.proto"
    text = path.read_text()
    assert old in text, f"{old!r} is not in {path.name}: update this test's edit"
    path.write_text(text.replace(old, new, 1))


def test_an_unchanged_copy_is_compatible(proto_copy: Path) -> None:
    """The two checks below fail for their edit, not for the copying."""
    result = _breaking(Path("proto"), str(ROOT / "proto"), proto_copy)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_removed_field_is_caught(proto_copy: Path) -> None:
    _edit(proto_copy, "uint64 step = 3;", "")
    result = _breaking(Path("proto"), str(ROOT / "proto"), proto_copy)
    assert result.returncode != 0
    assert 'field "3" with name "step"' in result.stdout, result.stdout + result.stderr


def test_a_renumbered_field_is_caught_against_the_git_input(proto_copy: Path) -> None:
    """The same git input the suite uses (here at HEAD) is really read and compared."""
    _edit(proto_copy, "uint64 step = 3;", "uint64 step = 4;")
    result = _breaking(Path("proto"), f"{ROOT / '.git'}#ref=HEAD,subdir=proto", proto_copy)
    assert result.returncode != 0
    assert "PolicyVersion" in result.stdout, result.stdout + result.stderr
