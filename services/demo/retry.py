"""HTTP calls that ride out a gateway or inference restart, as Atropos environments do.

An answer of 429 or 5xx (other than 501) and a connection that fails are retried with
exponential backoff and full jitter (`Retry-After`, where the gateway sends one, is
the least wait), until the call succeeds, answers something else, or `stop` is set.
Anything else is returned to the caller as is (a 4xx is the environment's own bug and
retrying it would not help). Each retry is logged; the first success after failures
says how long the outage lasted.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

import httpx

log = logging.getLogger("clotho.demo_env")

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


class Stopped(Exception):
    """The environment was told to stop while a call was being retried."""


@dataclass
class Backoff:
    """Exponential backoff with full jitter: attempt k waits uniform(0, min(cap, base * 2**k))."""

    base_seconds: float = 0.1
    max_seconds: float = 5.0
    rng: random.Random | None = None

    def delay(self, attempt: int, retry_after: float = 0.0) -> float:
        ceiling = min(self.max_seconds, self.base_seconds * (2 ** min(attempt, 30)))
        jitter = (self.rng or random).uniform(0.0, ceiling)
        return max(jitter, min(retry_after, self.max_seconds))


def _retry_after(response: httpx.Response) -> float:
    try:
        return max(float(response.headers.get("retry-after", "0")), 0.0)
    except ValueError:
        return 0.0


async def request(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    stop: asyncio.Event | None = None,
    backoff: Backoff | None = None,
    **kwargs: Any,
) -> httpx.Response:
    """`client.request(method, url, **kwargs)`, retried while the answer is transient.
    Raises Stopped if `stop` is set before a usable answer arrives."""
    backoff = backoff or Backoff()
    attempt = 0
    first_failure: float | None = None
    while True:
        if stop is not None and stop.is_set():
            raise Stopped(f"{method} {url}: stopped while retrying")
        wait_at_least = 0.0
        try:
            response = await client.request(method, url, **kwargs)
        except httpx.TransportError as exc:
            why = f"{type(exc).__name__}: {exc}"
        else:
            if response.status_code not in RETRY_STATUSES:
                if first_failure is not None:
                    log.info(
                        "%s %s answered again after %.1fs of failures", method, url, time.monotonic() - first_failure
                    )
                return response
            why = f"HTTP {response.status_code}: {response.text[:200]}"
            wait_at_least = _retry_after(response)
        if first_failure is None:
            first_failure = time.monotonic()
        delay = backoff.delay(attempt, wait_at_least)
        log.warning("%s %s failed (%s); retry %d in %.2fs", method, url, why, attempt + 1, delay)
        attempt += 1
        if stop is None:
            await asyncio.sleep(delay)
        else:
            try:
                await asyncio.wait_for(stop.wait(), timeout=delay)
            except TimeoutError:
                pass
