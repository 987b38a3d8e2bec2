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
    async def run(
        module: str, args: list[str], log_dir: Path, *, ready_timeout: float = 120.0, env: dict | None = None
    ):
        name = module.rsplit(".", 1)[-1]
        child = await launcher.start(name, module, args, log_dir, env=env)
        try:
            info = await launcher.wait_ready(child, ready_timeout)
            yield child, info
        finally:
            code = await launcher.stop(child, grace=30.0)
            tail = child.log_path.read_text(errors="replace")[-3000:] if child.log_path.exists() else ""
            assert code == 0, f"{module} exited with {code}:\n{tail}"

    return run


@pytest.fixture(scope="session", autouse=True)
def _gateway_session_store_dir(tmp_path_factory: pytest.TempPathFactory):
    """Gateways that session-scoped fixtures start keep their durable store in this
    session's temporary directory, never in ./.clotho/gateway (shared by every run)."""
    import os

    before = os.environ.get("CLOTHO_GATEWAY_DATA_DIR")
    os.environ["CLOTHO_GATEWAY_DATA_DIR"] = str(tmp_path_factory.mktemp("gateway-store-session"))
    yield
    if before is None:
        os.environ.pop("CLOTHO_GATEWAY_DATA_DIR", None)
    else:
        os.environ["CLOTHO_GATEWAY_DATA_DIR"] = before


@pytest.fixture(autouse=True)
def _gateway_store_dir(
    _gateway_session_store_dir: None, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every gateway a test starts, in process or as a child process, keeps its durable
    store in a fresh directory (a test passing --data-dir chooses its own)."""
    monkeypatch.setenv("CLOTHO_GATEWAY_DATA_DIR", str(tmp_path_factory.mktemp("gateway-store")))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny model's char tokenizer alone (for fakes that need no weights)."""
    from services.demo.tiny_model import build_tokenizer

    path = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(path)
    return str(path)
