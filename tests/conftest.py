"""Fixtures shared by every tier."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny local model (random init, char tokenizer) per test session."""
    from services.demo.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def service_process():
    """A factory of async context managers that run `python -m <module> <args>` as a real
    process, yield (child, ready_info) once it prints its ready line, then SIGTERM it and
    check that it exits cleanly (code 0)."""
    import contextlib

    from services import launcher

    @contextlib.asynccontextmanager
    async def run(module: str, args: list[str], log_dir: Path, *, ready_timeout: float = 120.0):
        name = module.rsplit(".", 1)[-1]
        child = await launcher.start(name, module, args, log_dir)
        try:
            info = await launcher.wait_ready(child, ready_timeout)
            yield child, info
        finally:
            code = await launcher.stop(child, grace=30.0)
            tail = child.log_path.read_text(errors="replace")[-3000:] if child.log_path.exists() else ""
            assert code == 0, f"{module} exited with {code}:\n{tail}"

    return run
