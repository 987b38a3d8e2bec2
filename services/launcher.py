"""Start services as child processes and learn where they listen.

Each service prints one JSON line `{"event": "ready", ...}` on stdout once it serves;
the launcher reads child stdout line by line (no polling), hands every other JSON line
to a callback and sends stderr to a log file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

LineHandler = Callable[[str, dict], Awaitable[None] | None]


@dataclass
class Child:
    name: str
    proc: asyncio.subprocess.Process
    ready: asyncio.Future
    log_path: Path
    reader: asyncio.Task | None = None
    events: list[dict] = field(default_factory=list)

    @property
    def info(self) -> dict:
        return self.ready.result()


async def _read_stdout(child: Child, on_event: LineHandler | None) -> None:
    assert child.proc.stdout is not None
    async for raw in child.proc.stdout:
        line = raw.decode(errors="replace").strip()
        if not line:
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(event, dict):
            continue
        if event.get("event") == "ready" and not child.ready.done():
            child.ready.set_result(event)
            continue
        if on_event is None:
            # Kept for callers that read them afterwards (tests); a handler owns them
            # otherwise, so a long-running parent (clotho up) does not grow per event.
            child.events.append(event)
        else:
            result = on_event(child.name, event)
            if asyncio.iscoroutine(result):
                await result
    if not child.ready.done():
        child.ready.set_exception(RuntimeError(f"{child.name} exited before it was ready; see {child.log_path}"))


async def start(
    name: str,
    module: str,
    args: list[str],
    log_dir: Path,
    on_event: LineHandler | None = None,
    env: dict[str, str] | None = None,
) -> Child:
    log_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once per child, at start
    log_path = log_dir / f"{name}.log"
    log_file = open(log_path, "ab")  # noqa: SIM115, ASYNC230 - kept open for the child's lifetime
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=log_file,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        start_new_session=True,  # Ctrl-C reaches the launcher, which stops children in order
    )
    log_file.close()
    child = Child(name, proc, asyncio.get_running_loop().create_future(), log_path)
    child.reader = asyncio.create_task(_read_stdout(child, on_event))
    return child


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (bound and released), for a child to bind next."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


async def start_command(name: str, argv: list[str], log_dir: Path, env: dict[str, str] | None = None) -> Child:
    """Start a command that announces nothing (a user's environment): its stdout and
    stderr both go to its log, and it counts as ready once started."""
    log_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once per child, at start
    log_path = log_dir / f"{name}.log"
    log_file = open(log_path, "ab")  # noqa: SIM115, ASYNC230 - kept open for the child's lifetime
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=log_file,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        start_new_session=True,
    )
    log_file.close()
    ready: asyncio.Future = asyncio.get_running_loop().create_future()
    ready.set_result({"event": "ready", "pid": proc.pid})
    return Child(name, proc, ready, log_path)


def log_tail(child: Child, lines: int = 20) -> str:
    """The last `lines` lines of a child's log."""
    try:
        text = child.log_path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


async def wait_ready(child: Child, timeout: float) -> dict:
    try:
        return await asyncio.wait_for(asyncio.shield(child.ready), timeout)
    except TimeoutError:
        raise RuntimeError(f"{child.name} not ready after {timeout:.0f}s; see {child.log_path}") from None


async def stop(child: Child, grace: float = 10.0) -> int | None:
    if child.proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            child.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(child.proc.wait(), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                child.proc.kill()
            await child.proc.wait()
    if child.reader is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(child.reader, 5)
    return child.proc.returncode
