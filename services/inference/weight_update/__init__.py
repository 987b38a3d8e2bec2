"""The receiving side of a weight update, shared by every shard: one state machine
(machine.py) over a loader per engine (loader.py says what a loader does; the torch
engine's and SGLang's live with their engines)."""

from services.inference.weight_update.loader import UpdateInFlight, WeightLoader
from services.inference.weight_update.machine import WeightUpdater
from services.inference.weight_update.request import GroupKey, PreparesByFields, Received, TransferResult, UpdateRequest

__all__ = [
    "GroupKey",
    "PreparesByFields",
    "Received",
    "TransferResult",
    "UpdateInFlight",
    "UpdateRequest",
    "WeightLoader",
    "WeightUpdater",
]
