"""Checkpoints: the weights as a Hugging Face directory (safetensors) plus the step and
policy version they belong to.

Layout: `<dir>/step-<N>/` with the model files and `trainer_state.json`, and
`<dir>/latest` naming the newest complete one. A checkpoint is written into a temporary
directory and renamed, so a crash never leaves a half-written `latest`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

STATE_FILE = "trainer_state.json"


def save(directory: str | Path, model: torch.nn.Module, step: int, policy_version: int) -> Path:
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    (tmp / STATE_FILE).write_text(json.dumps({"step": step, "policy_version": policy_version}) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    pointer = root / ".latest.tmp"
    pointer.write_text(final.name + "\n")
    os.replace(pointer, root / "latest")
    return final


def latest(directory: str | Path) -> Path | None:
    """The newest complete checkpoint in `directory`, if any."""
    pointer = Path(directory) / "latest"
    if not pointer.exists():
        return None
    path = Path(directory) / pointer.read_text().strip()
    return path if (path / STATE_FILE).exists() else None


def read_state(checkpoint: str | Path) -> dict:
    return json.loads((Path(checkpoint) / STATE_FILE).read_text())
