"""The trajectory store and batch assembly: Atropos' state (registration, queue,
per-env buffers, batches, step) held in memory, journaled to SQLite, served by both
the Atropos REST routes and GatewayService.

The state is `TrajectoryState` (state.py, put together from base.py, registry.py,
admission.py, batches.py and restore.py; records.py holds its records, wakeup.py
the primitive its waiters sleep on). The front doors change it only through
`DurableState` (durable.py), whose changes return once durable. journal.py is the one
mapping between records and the store's rows; store.py (the interface, and the
in-memory store) and sqlite_store.py (the SQLite journal) keep them. Scored data is
parsed and validated by scored_data.py (with the C fast path _scored_fast.c), the
queue is indexed by queue_index.py, version receipts live in receipts.py and
Atropos' buffer rule in packing.py.

May import services.common, orjson, pydantic and the standard library; never
fastapi, starlette, uvicorn or grpc (an import-linter contract checks it).

The names below are re-exported lazily: importing one module of this package (the
inference routes import receipts.py) does not load the state and the store.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from services.gateway.trajectory.durable import DurableState, TrajectoryView
    from services.gateway.trajectory.queue_index import Group, QueueIndex
    from services.gateway.trajectory.receipts import Receipts
    from services.gateway.trajectory.records import (
        EnvRegistered,
        EnvRegistration,
        EnvStatus,
        StoreFull,
        Submitted,
        TrainerRegistration,
    )
    from services.gateway.trajectory.scored_data import ScoredDataInvalid
    from services.gateway.trajectory.sqlite_store import SqliteStore
    from services.gateway.trajectory.state import TrajectoryState
    from services.gateway.trajectory.store import Store, open_store

_EXPORTS = {
    "DurableState": "durable",
    "TrajectoryView": "durable",
    "Group": "queue_index",
    "QueueIndex": "queue_index",
    "Receipts": "receipts",
    "EnvRegistered": "records",
    "EnvRegistration": "records",
    "EnvStatus": "records",
    "StoreFull": "records",
    "Submitted": "records",
    "TrainerRegistration": "records",
    "ScoredDataInvalid": "scored_data",
    "SqliteStore": "sqlite_store",
    "TrajectoryState": "state",
    "Store": "store",
    "open_store": "store",
}
__all__ = [
    "DurableState",
    "EnvRegistered",
    "EnvRegistration",
    "EnvStatus",
    "Group",
    "QueueIndex",
    "Receipts",
    "ScoredDataInvalid",
    "SqliteStore",
    "Store",
    "StoreFull",
    "Submitted",
    "TrainerRegistration",
    "TrajectoryState",
    "TrajectoryView",
    "open_store",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
