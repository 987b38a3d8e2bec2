"""`clotho up --trace-ui`: a local trace viewer (Arize Phoenix) for the run's spans.

Phoenix is an optional extra (`pip install 'clotho[trace-ui]'`, about 860 MB): it runs
on this machine as an OTLP receiver with a web view and fetches nothing at run time.
`clotho up` starts it first, points every child at it through the standard OTEL_*
variables (`otel_env`) and stops it last. Phoenix's own OTLP gRPC port listens on every
interface whatever host it is given; its web view and OTLP/HTTP port bind loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

INSTALL_HINT = (
    "--trace-ui needs the trace-ui extra (Arize Phoenix, about 860 MB installed): "
    "pip install 'clotho[trace-ui]'  (or: pip install arize-phoenix). "
    "Without it, send spans to any OTLP receiver with OTEL_EXPORTER_OTLP_ENDPOINT."
)


def available() -> bool:
    """Whether Phoenix is installed."""
    return importlib.util.find_spec("phoenix") is not None


def otel_env(otlp_grpc_endpoint: str) -> dict[str, str]:
    """The OTEL_* variables that make a Clotho process export its spans to the receiver
    at `otlp_grpc_endpoint` (http://host:port, OTLP over gRPC), every span sampled."""
    return {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": otlp_grpc_endpoint,
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_TRACES_INSECURE": "true",
        "OTEL_TRACES_SAMPLER": "parentbased_always_on",
    }


@dataclass
class TraceUI:
    """A running Phoenix server."""

    proc: asyncio.subprocess.Process
    ui_url: str
    otlp_grpc_endpoint: str
    log_path: Path

    async def stop(self, grace: float = 10.0) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), grace)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()


async def start(data_dir: Path, ui_port: int, grpc_port: int, log_dir: Path, timeout: float = 120.0) -> TraceUI:
    """Start Phoenix with its data in `data_dir` and wait until its web view answers."""
    data_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, at start
    log_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, at start
    log_path = log_dir / "trace-ui.log"
    env = {
        **os.environ,
        "PHOENIX_HOST": "127.0.0.1",
        "PHOENIX_PORT": str(ui_port),
        "PHOENIX_GRPC_PORT": str(grpc_port),
        "PHOENIX_WORKING_DIR": str(data_dir),
        # Phoenix's own spans stay out of the run's traces.
        "OTEL_TRACES_EXPORTER": "none",
    }
    with open(log_path, "ab") as log_file:  # noqa: ASYNC230 - handed to the child
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "phoenix.server.main",
            "serve",
            stdout=log_file,
            stderr=log_file,
            env=env,
            start_new_session=True,
        )
    ui = TraceUI(proc, f"http://127.0.0.1:{ui_port}", f"http://127.0.0.1:{grpc_port}", log_path)
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=2.0) as client:
        while True:
            if proc.returncode is not None:
                raise RuntimeError(f"the trace UI exited with {proc.returncode}; see {log_path}")
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(f"{ui.ui_url}/healthz")).status_code == 200:
                    return ui
            if time.monotonic() > deadline:
                await ui.stop()
                raise RuntimeError(f"the trace UI did not answer within {timeout:.0f}s; see {log_path}")
            await asyncio.sleep(0.25)


__all__ = ["INSTALL_HINT", "TraceUI", "available", "otel_env", "start"]
