"""The trainer's weight push: WeightSync sends a model's parameters to every inference
shard as one versioned update (sender.py); report.py holds what a push returns or raises."""

from services.trainer.weight_push.report import SyncReport, WeightSyncError
from services.trainer.weight_push.sender import WeightSync

__all__ = ["SyncReport", "WeightSync", "WeightSyncError"]
