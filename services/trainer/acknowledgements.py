"""What rank 0 tells the gateway about the batches it consumed, so that a batch is
forgotten by the gateway only once a checkpoint holds it.

Batches carry the gateway's step (`StreamBatchesResponse.step`), which is not the
trainer's own step (the gateway's counter also moves for /batch, and a trainer may
start against a gateway that served others). The learner records the gateway step of
the last batch it consumed; every checkpoint stores it (`checkpoint.BATCH_STEP`).
On each StreamBatches stream:

- the first message carries `resume_step`: the last batch the weights include (after
  a restart, the checkpoint's; after a reconnect, the last one consumed), and
  `checkpointed_step`: the last batch the newest checkpoint holds. The gateway gives
  the stream every batch it kept after `resume_step` first, then new ones;
- after each checkpoint the next message (a credit, or one with no credits) carries
  the new `checkpointed_step`, and the gateway forgets the batches up to it.

A trainer without a checkpoint directory has nothing to resume from: it leaves both
fields unset and gets /batch's at-most-once delivery.
"""

from __future__ import annotations

from typing import Any

from clotho.v1 import gateway_service_pb2 as gw_pb
from services.trainer import checkpoint


class BatchAcknowledgements:
    """The gateway steps consumed and checkpointed, and what the next message says."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        # Gateway step of the last batch consumed, and of the last one a checkpoint holds.
        self.consumed = 0
        self.checkpointed = 0
        self._reported: int | None = None
        self._opening = False

    def restore(self, state: dict[str, Any]) -> None:
        """From a checkpoint's trainer state (its step when it predates batch steps)."""
        self.consumed = self.checkpointed = checkpoint.batch_step(state)

    def open_stream(self) -> None:
        """A new StreamBatches call: its first message says where the trainer is."""
        self._opening = True
        self._reported = None

    def consume(self, step: int) -> None:
        """A batch of gateway step `step` is being trained on (or skipped)."""
        self.consumed = step

    def checkpoint_fields(self) -> dict[str, Any]:
        """What a checkpoint written now stores (pass it to `saved` once it is written)."""
        return {checkpoint.BATCH_STEP: self.consumed}

    def saved(self, fields: dict[str, Any]) -> None:
        self.checkpointed = int(fields[checkpoint.BATCH_STEP])

    @property
    def unreported(self) -> bool:
        """A checkpoint holds batches the gateway has not been told of."""
        return self.enabled and not self._opening and self._reported != self.checkpointed

    def annotate(self, request: gw_pb.StreamBatchesRequest) -> gw_pb.StreamBatchesRequest:
        """Add what the gateway has not been told yet to a message about to be sent."""
        if not self.enabled:
            return request
        if self._opening:
            request.resume_step = self.consumed
            self._opening = False
        if self._reported != self.checkpointed:
            request.checkpointed_step = self.checkpointed
            self._reported = self.checkpointed
        return request
