"""The gateway learns the model's vocabulary size from the inference service, so that
the door (trajectory/door.py) refuses token ids no trainer could embed.

`GetModelInfo.vocab_size` is asked of the inference pool until one answers with it
(retried with backoff while no target is up); without inference targets, or from a
service that does not report it (0), the door refuses only negative ids.
"""

from __future__ import annotations

import asyncio
import logging

from services.gateway.generation.pool import InferencePool
from services.gateway.trajectory.state import TrajectoryState

log = logging.getLogger(__name__)


async def learn_vocabulary(
    inference: InferencePool, state: TrajectoryState, first_delay: float = 0.5, max_delay: float = 10.0
) -> None:
    """Set `state.vocab_size` once an inference target reports it; returns then, or at
    once when no inference is configured or the service does not report one."""
    if not inference.configured:
        return
    delay = first_delay
    while True:
        try:
            info = await inference.model_info(refresh=True, timeout=5.0)
        except Exception as exc:  # noqa: BLE001 - not up yet: ask again later
            log.debug("vocabulary size not known yet: %r", exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay)
            continue
        if info.vocab_size:
            state.vocab_size = int(info.vocab_size)
            log.info("token ids checked against the model's vocabulary (%d)", state.vocab_size)
        else:
            log.warning("the inference service does not report its vocabulary size: only negative ids are refused")
        return
