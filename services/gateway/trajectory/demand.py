"""How long the trainer has waited for batches: the signal environments pace their lead on.

A StreamBatches credit the gateway has not yet answered with a batch is a batch the
trainer asked for and the queue could not form. `TrainerDemand` counts those credits
over every stream and adds up the time during which at least one was outstanding.
An environment that reads the total twice (`/status-env?wait=...`, the demo env's
long poll) knows what fraction of that interval the trainer spent waiting for data:
near zero while the trainer is the bottleneck, a large part of each step while
generation is. With `next_batch: after_step` (clotho up) a credit is outstanding only
while the trainer needs its next batch; a trainer that asks on arrival keeps one
credit outstanding during its whole step, so it reads as always waiting.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class TrainerDemand:
    """Credits outstanding (asked for, not yet answered) and the seconds during which
    there were any. Synchronous: called from the event loop only."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.outstanding = 0
        self._since: float | None = None
        self._waited = 0.0

    def asked(self, credits: int) -> None:
        if credits <= 0:
            return
        if self.outstanding == 0:
            self._since = self._clock()
        self.outstanding += credits

    def answered(self, credits: int = 1) -> None:
        """Credits answered with a batch, or withdrawn (the stream ended)."""
        credits = min(credits, self.outstanding)
        if credits <= 0:
            return
        self.outstanding -= credits
        if self.outstanding == 0 and self._since is not None:
            self._waited += self._clock() - self._since
            self._since = None

    def waited_seconds(self) -> float:
        """Seconds, since the gateway started, during which a credit was outstanding."""
        if self._since is None:
            return self._waited
        return self._waited + (self._clock() - self._since)
