"""Deadlines and liveness for one call to an inference target (`CallGuard`).

A guard runs beside a call as one task and cancels the call when

- its target is lost (routing.py sets `Target.lost` when the liveness probe finds the
  process frozen or the health stream finds it unreachable): the guard's error is
  Unavailable, and the pool retries elsewhere if nothing was streamed yet;
- a streaming call's first message takes longer than `first_token_seconds`, or the
  gap between two messages exceeds `idle_seconds`: DeadlineExceeded (504).

The consumer calls `progress()` on every message, which costs one clock read; the
guard wakes only at deadlines and on loss. After a cancellation the pool reads
`error` to tell the guard's cancellation from its own caller's.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Any

from services.common.errors import ClothoError, DeadlineExceeded, Unavailable
from services.gateway.generation.routing import Target


@dataclass(frozen=True)
class Deadlines:
    """Per-call bounds on a streaming call (0 turns one off)."""

    first_token_seconds: float = 120.0
    idle_seconds: float = 60.0


class CallGuard:
    """Watches one call to `target`; `streaming` calls get the token deadlines too."""

    def __init__(self, call: Any, target: Target, deadlines: Deadlines, streaming: bool) -> None:
        self._call = call
        self._target = target
        self._deadlines = deadlines
        self._streaming = streaming
        self._loop = asyncio.get_running_loop()
        self.started = self._loop.time()
        self.last = self.started
        self.received = False
        self.error: ClothoError | None = None
        # The task's coroutine holds this guard; the guard lets go of the task when it
        # is closed, so no cycle (task -> guard -> task) keeps a finished call, its
        # request and its cancellation traceback alive until a full garbage collection.
        self._task: asyncio.Task[None] | None = asyncio.create_task(self._run(), name=f"guard {target.address}")

    def progress(self) -> None:
        self.received = True
        self.last = self._loop.time()

    def _deadline(self) -> float:
        if not self._streaming:
            return math.inf
        limit = self._deadlines.idle_seconds if self.received else self._deadlines.first_token_seconds
        return self.last + limit if limit > 0 else math.inf

    async def _run(self) -> None:
        address = self._target.address
        while True:
            deadline = self._deadline()
            left = deadline - self._loop.time()
            if left <= 0:
                if self.received:
                    self.error = DeadlineExceeded(
                        f"inference target {address} sent nothing for {self._deadlines.idle_seconds:g}s mid-stream"
                    )
                else:
                    self.error = DeadlineExceeded(
                        f"inference target {address} sent no first token within "
                        f"{self._deadlines.first_token_seconds:g}s"
                    )
                break
            try:
                await asyncio.wait_for(self._target.lost.wait(), None if math.isinf(left) else left)
            except TimeoutError:
                continue
            self.error = Unavailable(f"inference target {address} stopped responding: {self._target.why_lost}")
            break
        self._call.cancel()

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
