"""The trajectory state behind both the Atropos REST routes and GatewayService.

One `TrajectoryState` per gateway holds what Atropos keeps on `app.state`: the
trainer's registration, the environments, the queue of scored groups, the per-env
buffer of groups whose size differs from the env's group size, the step counter, the
`started` flag, the batches formed but not yet handed out (`curr_batch`) and the
latest example. It is put together from its parts, one job each:

- base.py: the fields and every read (`/status`, `/info`, GetStatus, /metrics);
- registry.py: trainer and environment registration, `/status-env`;
- admission.py: submission, attribution, buffering, the store's bounds;
- batches.py: batch formation (`/batch` and StreamBatches) and staleness;
- acknowledged.py: batches kept for a trainer until its checkpoint holds them,
  replayed in order when it restarts;
- restore.py: `/reset_data` and the restart from the store.

Every method is synchronous and runs on the event loop, so each call is atomic, and
each change is appended, in the same order, to the journal (journal.py, the one
mapping between these records and the store's rows). A mutator calls
`journal.check()` before it changes anything, so a store that failed refuses the
change while memory is still intact. The routes and the servicer do not call these
methods: they hold a `DurableState` (durable.py), whose every change returns only
once it is durable.

On top of Atropos:
- the queue is indexed (queue_index.py): forming a batch costs what the batch costs;
- the store is bounded: past `max_groups` held groups (or `max_bytes`) a submission
  is refused with `StoreFull` and nothing accepted is ever dropped for room;
- every sequence carries a policy version (explicit from the client, else a receipt
  of the completion the gateway served, else the version current at submission), and
  batch assembly enforces `max_staleness` by dropping stale groups before a batch is
  formed (then `/batch` forms one batch per call, so no batch waits formed while its
  data goes stale), or by keeping and counting them.

Waiters (StreamBatches) do not poll: every mutation calls `wakeup.notify()` and they
re-check their condition.
"""

from __future__ import annotations

import logging

from services.gateway.trajectory.acknowledged import DEFAULT_MAX_KEPT_BATCHES, Acknowledged
from services.gateway.trajectory.admission import Admission
from services.gateway.trajectory.demand import TrainerDemand
from services.gateway.trajectory.journal import Journal
from services.gateway.trajectory.receipts import Receipts
from services.gateway.trajectory.records import Counters, StalenessPolicy
from services.gateway.trajectory.restore import ResetRestore
from services.gateway.trajectory.store import Store
from services.gateway.trajectory.wakeup import Wakeup

log = logging.getLogger(__name__)


class TrajectoryState(Admission, Acknowledged, ResetRestore):
    """Registration, queue, buffering and batch assembly with Atropos' semantics."""

    def __init__(
        self,
        store: Store | None = None,
        receipts: Receipts | None = None,
        *,
        max_groups: int = 0,
        max_bytes: int = 0,
        retry_after_seconds: int = 1,
        max_staleness: int = 0,
        staleness_policy: StalenessPolicy = "drop",
        max_kept_batches: int = DEFAULT_MAX_KEPT_BATCHES,
        refuse_oversized_groups: bool = False,
    ) -> None:
        if staleness_policy not in ("drop", "keep"):
            raise ValueError(f"staleness_policy must be 'drop' or 'keep', not {staleness_policy!r}")
        self.wakeup = Wakeup()
        # StreamBatches credits outstanding and how long the trainer waited (demand.py).
        self.demand = TrainerDemand()
        self.store = store if store is not None else Store()
        self.journal = Journal(self.store)
        self.receipts = receipts if receipts is not None else Receipts()
        self.max_groups = max_groups
        self.max_bytes = max_bytes
        self.retry_after_seconds = retry_after_seconds
        self.max_staleness = max_staleness
        self.staleness_policy = staleness_policy
        self.max_kept_batches = max_kept_batches
        self.refuse_oversized_groups = refuse_oversized_groups
        self.counters = Counters()
        self._reported_version = 0
        self._latest = None
        self._max_token_len_after_reset = -1
        self._next_id = 0
        self._next_qpos = 0
        self._next_formation = 0
        self._clear()
        self._restore(self.journal.load())
        if self.journal.durable:
            self.receipts.sink = self.journal.receipt

    def reload(self) -> None:
        """Rebuild the state from what the store committed (after a failed commit, so
        that memory holds no change the store lost). Counters are kept."""
        try:
            restored = self.journal.load()
        except Exception:  # the store refuses changes either way
            log.exception("could not reload the trajectory state from the failed store")
            return
        self._clear()
        self._restore(restored)
        log.warning("the trajectory store failed: the state is back to its last commit and refuses changes")
        self.wakeup.notify()
