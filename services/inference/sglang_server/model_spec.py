"""What the service knows of the model an SGLang server serves, without loading its weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class ModelSpec:
    """What the service knows of the served model without loading its weights."""

    param_specs: dict[str, tuple[tuple[int, ...], torch.dtype]]
    vocab_size: int
    max_context_len: int

    @classmethod
    def from_model_dir(cls, model_path: str | Path, max_context_len: int | None = None) -> ModelSpec:
        """Parameter names and shapes from the config (a model built on the meta device)."""
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(str(model_path))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        specs = {name: (tuple(p.shape), p.dtype) for name, p in model.named_parameters()}
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        context = max_context_len or int(getattr(text, "max_position_embeddings", 0) or 2048)
        return cls(specs, int(text.vocab_size), context)
