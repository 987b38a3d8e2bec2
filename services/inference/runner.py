"""The model and its forward passes: left-padded prefill into a fresh KV cache, one-token
decode steps on that cache, and copying new weights in.

Only the engine's worker thread calls into a ModelRunner.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import torch
from transformers import AutoModelForCausalLM, DynamicCache

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelRunner:
    def __init__(self, model_path: Path, device: str, dtype: str) -> None:
        self.device = torch.device(device)
        self.model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=TORCH_DTYPES[dtype])
        self.model.to(self.device).eval()
        self.model.requires_grad_(False)
        config = self.model.config
        self.vocab_size = int(self.model.get_input_embeddings().num_embeddings)
        self.max_positions = int(getattr(config, "max_position_embeddings", 0) or 0)
        pad = getattr(config, "pad_token_id", None)
        # Padded positions are masked out; any id inside the vocabulary will do.
        self.pad_id = int(pad) if isinstance(pad, int) and 0 <= pad < self.vocab_size else 0
        self.parameter_specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
            name: (tuple(p.shape), p.dtype) for name, p in self.model.named_parameters()
        }

    def prefill(
        self, sequences: Sequence[Sequence[int]], all_logits: bool
    ) -> tuple[torch.Tensor, DynamicCache, torch.Tensor]:
        """Run whole sequences, left-padded to a common length, into a new cache.

        Position ids count real tokens only, so a padded row computes exactly what it
        would alone. Returns (logits [B, L or 1, V], cache, attention mask [B, L]).
        """
        length = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), length), dtype=torch.long)
        for row, seq in enumerate(sequences):
            ids[row, length - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[row, length - len(seq) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=0 if all_logits else 1,
        )
        return out.logits, out.past_key_values, mask

    def decode(
        self, tokens: Sequence[int], positions: Sequence[int], cache: DynamicCache, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step: feed each row's newest token at its position. Returns (logits [B, V],
        the attention mask grown by one column)."""
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        out = self.model(
            input_ids=torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None],
            attention_mask=mask,
            position_ids=torch.tensor(positions, dtype=torch.long, device=self.device)[:, None],
            past_key_values=cache,
            use_cache=True,
        )
        return out.logits[:, -1], mask

    def check_weights(self, staged: Mapping[str, torch.Tensor]) -> None:
        """Raise ValueError naming the first tensor that does not fit the model."""
        missing = sorted(set(self.parameter_specs) - set(staged))
        if missing:
            raise ValueError(f"update lacks parameter {missing[0]!r} ({len(missing)} missing)")
        for name, tensor in staged.items():
            spec = self.parameter_specs.get(name)
            if spec is None:
                raise ValueError(f"update has tensor {name!r}, which the model does not have")
            if tuple(tensor.shape) != spec[0]:
                raise ValueError(f"tensor {name!r}: shape {tuple(tensor.shape)} != model's {spec[0]}")
            if not tensor.dtype.is_floating_point:
                raise ValueError(f"tensor {name!r}: dtype {tensor.dtype} is not a float type")

    def load_weights(self, staged: Mapping[str, torch.Tensor]) -> None:
        """Copy every staged tensor into its parameter. Checked in full first, so the
        copy cannot stop half-way on a bad tensor."""
        self.check_weights(staged)
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in staged.items():
                params[name].copy_(tensor, non_blocking=False)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
