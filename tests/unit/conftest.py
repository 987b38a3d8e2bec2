"""Fixtures the engine's unit tests share (a module may define its own `engine`)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from services.inference.torch_engine.engine import GenerationEngine


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    """A torch engine on the tiny model, one per test module."""
    eng = GenerationEngine(tiny_model_dir, max_batch_size=16)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    """The same tiny model through plain transformers: the reference."""
    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
