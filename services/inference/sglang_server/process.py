"""Launching SGLang servers as child processes (`python -m sglang.launch_server`) on
loopback, waiting until they answer /health, and stopping them. While this process
exports spans over OTLP, launched servers get SGLang's tracing flags too."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import shlex
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from services.common.telemetry import export_mode

log = logging.getLogger(__name__)


def sglang_installed() -> bool:
    return importlib.util.find_spec("sglang") is not None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


async def wait_healthy(
    client: httpx.AsyncClient, timeout: float, process: asyncio.subprocess.Process | None = None
) -> None:
    """Poll GET /health until it answers 200; raise TimeoutError past `timeout`, or
    RuntimeError when the launched process exits first."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last = "no answer yet"
    while True:
        if process is not None and process.returncode is not None:
            raise RuntimeError(f"the SGLang server exited with code {process.returncode} before it was healthy")
        try:
            response = await client.get("/health", timeout=5.0)
            if response.status_code == 200:
                return
            last = f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}: {exc}"
        if loop.time() >= deadline:
            raise TimeoutError(f"{client.base_url} did not become healthy within {timeout:.0f}s ({last})")
        await asyncio.sleep(min(1.0, max(0.0, deadline - loop.time())))


def sglang_trace_args(env: Mapping[str, str], extra_args: Sequence[str]) -> list[str]:
    """SGLang's own tracing flags when this process exports spans over OTLP (the
    same collector; SGLang then continues the `traceparent` of each /generate), unless
    the extra args already say."""
    if export_mode(env) != "otlp" or "--enable-trace" in extra_args:
        return []
    endpoint = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "localhost:4317"
    )
    # SGLang takes host:port (its exporter speaks OTLP/gRPC).
    host_port = urlsplit(endpoint).netloc if "://" in endpoint else endpoint
    return ["--enable-trace", "--otlp-traces-endpoint", host_port]


class SGLangProcess:
    """One `python -m sglang.launch_server` child on 127.0.0.1, its output in a log file."""

    def __init__(self, model_path: str, gpu_id: int, extra_args: str, log_dir: Path | None = None) -> None:
        self.model_path = model_path
        self.gpu_id = gpu_id
        self.extra_args = shlex.split(extra_args)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = (log_dir or Path.cwd()) / f"sglang-{self.port}.log"
        self.process: asyncio.subprocess.Process | None = None

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "sglang.launch_server",
            "--model-path",
            self.model_path,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--base-gpu-id",
            str(self.gpu_id),
            *sglang_trace_args(os.environ, self.extra_args),
            *self.extra_args,
        ]

    async def start(self) -> None:
        if not sglang_installed():
            raise RuntimeError(
                "engine=sglang with no --sglang-urls launches SGLang servers, but the `sglang` package "
                "is not installed (pip install 'clotho[sglang]' on a GPU machine)"
            )
        log.info("launching SGLang: %s (log %s)", shlex.join(self.command()), self.log_path)
        with open(self.log_path, "ab") as out:  # noqa: ASYNC230 - a local log file, opened once
            self.process = await asyncio.create_subprocess_exec(
                *self.command(), stdout=out, stderr=asyncio.subprocess.STDOUT, start_new_session=True
            )

    async def stop(self, grace: float = 30.0) -> None:
        """SIGTERM the server's process group (it spawns scheduler and detokenizer
        processes), SIGKILL it after `grace`."""
        proc, self.process = self.process, None
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            log.warning("SGLang server %s ignored SIGTERM for %.0fs; killing it", self.url, grace)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
