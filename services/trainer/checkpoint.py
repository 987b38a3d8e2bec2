"""Checkpoints: everything a restart needs to carry on where training stopped.

Layout of `<dir>/step-<N>/`:
  config.json, model.safetensors   the weights as a Hugging Face model directory
  optimizer.pt, scheduler.pt       optimizer and LR-scheduler state (torch.save)
  rng-rank<R>.pt                   each rank's torch / CUDA / Python / NumPy RNG state
  trainer_state.json               step, policy version (the last one every shard
                                   committed), the gateway step of the last batch
                                   trained (`batch_step`) and the learner's running
                                   statistics
and `<dir>/latest` names the newest complete one. A checkpoint is written into a
temporary directory and renamed, so a crash (even kill -9) never leaves a half-written
`latest`; the oldest complete ones beyond `keep` are deleted.

Writing is split in steps so that every rank can take part (see Learner.save_checkpoint):
`begin` (rank 0), `write_rng` (every rank), `write_leader` (rank 0), `finish` (rank 0).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")
# The gateway step of the last batch the checkpoint's weights include.
BATCH_STEP = "batch_step"


def begin(directory: str | Path, step: int) -> Path:
    """A fresh temporary directory for the checkpoint of `step`."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_rng(tmp: str | Path, rank: int) -> None:
    torch.save(rng_state(), Path(tmp) / f"rng-rank{rank}.pt")


def write_leader(
    tmp: str | Path,
    model: torch.nn.Module,
    *,
    state: dict[str, Any],
    optimizer_state: dict[str, Any] | None = None,
    scheduler_state: dict[str, Any] | None = None,
    model_state: dict[str, Any] | None = None,
) -> None:
    """Rank 0's part: weights (from `model_state` when given, e.g. gathered from FSDP
    shards), optimizer, scheduler and the JSON state (written last)."""
    tmp = Path(tmp)
    cast("PreTrainedModel", model).save_pretrained(tmp, state_dict=model_state)  # a Hugging Face model
    if optimizer_state is not None:
        torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
    if scheduler_state is not None:
        torch.save(scheduler_state, tmp / SCHEDULER_FILE)
    (tmp / STATE_FILE).write_text(json.dumps(state) + "\n")


def finish(directory: str | Path, tmp: str | Path, step: int, keep: int = 0) -> Path:
    """Publish the checkpoint: rename it into place, point `latest` at it, prune."""
    root = Path(directory)
    final = root / f"step-{step}"
    shutil.rmtree(final, ignore_errors=True)
    Path(tmp).rename(final)
    _fsync_dir(root)
    pointer = root / ".latest.tmp"
    pointer.write_text(final.name + "\n")
    os.replace(pointer, root / "latest")
    _fsync_dir(root)
    if keep > 0:
        for old in complete(root)[:-keep]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final


def save(
    directory: str | Path,
    model: torch.nn.Module,
    step: int,
    policy_version: int,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    extra: dict[str, Any] | None = None,
    keep: int = 0,
) -> Path:
    """A whole checkpoint from one process (rank 0 of 1)."""
    tmp = begin(directory, step)
    write_rng(tmp, 0)
    write_leader(
        tmp,
        model,
        state={"step": step, "policy_version": policy_version, **(extra or {})},
        optimizer_state=optimizer.state_dict() if optimizer is not None else None,
        scheduler_state=scheduler.state_dict() if scheduler is not None else None,
    )
    return finish(directory, tmp, step, keep)


def complete(directory: str | Path) -> list[Path]:
    """Complete checkpoints in `directory`, oldest first."""
    root = Path(directory)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and (child / STATE_FILE).exists():
            found.append((int(m.group(1)), child))
    return [p for _, p in sorted(found)]


def latest(directory: str | Path) -> Path | None:
    """The newest complete checkpoint in `directory`, if any."""
    pointer = Path(directory) / "latest"
    if not pointer.exists():
        return None
    path = Path(directory) / pointer.read_text().strip()
    return path if (path / STATE_FILE).exists() else None


def read_state(checkpoint: str | Path) -> dict:
    return json.loads((Path(checkpoint) / STATE_FILE).read_text())


def batch_step(state: dict[str, Any]) -> int:
    """The gateway step of the last batch a checkpoint's trainer state holds (its own
    step for checkpoints written before batch steps were recorded)."""
    return int(state.get(BATCH_STEP, state.get("step", 0)))


def load_optimizer_state(checkpoint: str | Path) -> dict | None:
    path = Path(checkpoint) / OPTIMIZER_FILE
    return torch.load(path, map_location="cpu", weights_only=False) if path.exists() else None


def load_scheduler_state(checkpoint: str | Path) -> dict | None:
    path = Path(checkpoint) / SCHEDULER_FILE
    return torch.load(path, map_location="cpu", weights_only=False) if path.exists() else None


def restore_rng(checkpoint: str | Path, rank: int) -> bool:
    path = Path(checkpoint) / f"rng-rank{rank}.pt"
    if not path.exists():
        return False
    set_rng_state(torch.load(path, map_location="cpu", weights_only=False))
    return True


def _fsync_dir(path: Path) -> None:
    # The rename must survive a power cut as well as a kill -9.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
