"""The wake-up primitive waiters (StreamBatches) sleep on instead of polling."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class Wakeup:
    """Wakes every waiter when the state changes (an asyncio.Condition whose notify
    needs no lock, so synchronous mutators can call it)."""

    def __init__(self) -> None:
        self._waiters: set[asyncio.Future[None]] = set()

    def notify(self) -> None:
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(None)

    async def wait(self) -> None:
        fut = asyncio.get_running_loop().create_future()
        self._waiters.add(fut)
        try:
            await fut
        finally:
            self._waiters.discard(fut)

    async def wait_for(self, predicate: Callable[[], T]) -> T:
        """Wait until `predicate()` is truthy and return its value. The check and the
        registration of the waiter happen without yielding, so no wakeup is lost."""
        while not (result := predicate()):
            await self.wait()
        return result
