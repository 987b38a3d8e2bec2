"""An optional log of every batch the trainer trained on: one JSON line per batch,
`{"batch_step", "step", "groups"}`, each group as the CRC32 of its sequences' token ids
(int64 little-endian, concatenated). Lets tests and operators count which groups were
trained, and how often (setting `batch_log`, env CLOTHO_BATCH_LOG). Lines are flushed
as written, so a killed trainer leaves every line of the steps it finished."""

from __future__ import annotations

import json
import zlib
from array import array
from collections.abc import Sequence
from pathlib import Path

from clotho.v1 import scored_data_pb2


def group_digest(group: scored_data_pb2.ScoredGroup) -> int:
    """CRC32 of the group's token ids, sequence after sequence, as int64 little-endian."""
    crc = 0
    for seq in group.sequences:
        crc = zlib.crc32(array("q", seq.tokens).tobytes(), crc)
    return crc


class BatchLog:
    """Appends one line per trained batch to `path` (nothing when `path` is empty)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path) if path else None

    def record(self, batch_step: int, step: int, groups: Sequence[scored_data_pb2.ScoredGroup]) -> None:
        if self.path is None:
            return
        line = {"batch_step": batch_step, "step": step, "groups": [group_digest(g) for g in groups]}
        with self.path.open("a") as f:
            f.write(json.dumps(line) + "\n")
