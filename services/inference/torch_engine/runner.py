"""The model and its forward passes over a SlotKVCache: prefill of left-padded prompts into
chosen cache rows, one-token decode steps for every row, several tokens per row after
what the rows hold (extend), and copying new weights in.

Positions and the 4D attention mask are always built here and passed explicitly, so the
model never infers them from padding or from the cache. Only the engine's worker thread
calls into a ModelRunner.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import cast

import torch
from transformers import AutoModelForCausalLM

from services.common.weight_wire.dtypes import from_name
from services.inference.torch_engine.kv_cache import SlotKVCache, additive_mask
from services.inference.torch_engine.lean_llama import LeanLlama

log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, model_path: Path, device: str, dtype: str, *, single_thread_work: float = 0.0) -> None:
        self.device = torch.device(device)
        resolved = from_name(dtype)
        if resolved is None:
            raise KeyError(dtype)
        self.dtype = resolved
        self.model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=self.dtype, attn_implementation="sdpa")
        # transformers wraps `to` with functools.wraps(Module.to), which types it unbound.
        self.model.to(self.device).eval()  # type: ignore[arg-type]
        self.model.requires_grad_(False)
        config = self.model.config
        self.vocab_size = int(cast(torch.nn.Embedding, self.model.get_input_embeddings()).num_embeddings)
        self.max_positions = int(getattr(config, "max_position_embeddings", 0) or 0)
        # A full causal mask equals a sliding-window one while sequences fit the window.
        window = getattr(config, "sliding_window", None)
        if (
            isinstance(window, int)
            and window > 0
            and getattr(config, "use_sliding_window", True)
            and (not self.max_positions or window < self.max_positions)
        ):
            log.info("model has a %d-token sliding window: sequences are limited to it", window)
            self.max_positions = window
        pad = getattr(config, "pad_token_id", None)
        # Padded positions are masked out; any id inside the vocabulary will do.
        self.pad_id = int(pad) if isinstance(pad, int) and 0 <= pad < self.vocab_size else 0
        self.parameter_specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
            name: (tuple(p.shape), p.dtype) for name, p in self.model.named_parameters()
        }
        # CPU passes below this many parameter x token products run on one intra-op thread
        # (0: never). The pool's size is per calling thread; the worker's own is read on its
        # first pass.
        self.single_thread_work = single_thread_work if self.device.type == "cpu" else 0.0
        self.parameters = sum(math.prod(shape) for shape, _ in self.parameter_specs.values())
        self._pool_threads = 0
        self._threads_now = 0
        # The model's forward without the transformers wrappers, where it is exact (None:
        # the model is called).
        self.lean: LeanLlama | None = LeanLlama(self.model) if LeanLlama.supports(self.model) else None
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = int(text.num_attention_heads)
        self.num_layers = int(text.num_hidden_layers)
        self.kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
        self.head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)

    def new_cache(self, max_slots: int) -> SlotKVCache:
        return SlotKVCache(self.num_layers, self.kv_heads, self.head_dim, self.dtype, self.device, max_slots)

    def prefill(
        self,
        cache: SlotKVCache,
        sequences: Sequence[Sequence[int]],
        dest: Sequence[int],
        src: Sequence[int],
        all_logits: bool,
    ) -> torch.Tensor:
        """Run whole sequences, left-padded to a common width, and store sequence src[j]'s
        keys and values in cache row dest[j]. Position ids count real tokens only, so a
        padded row computes exactly what it would alone. Returns logits [B, width or 1, V]."""
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        valid = torch.zeros((len(sequences), width), dtype=torch.bool)
        for row, seq in enumerate(sequences):
            ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            valid[row, width - len(seq) :] = True
        ids, valid = ids.to(self.device), valid.to(self.device)
        positions = (valid.long().cumsum(dim=-1) - 1).clamp(min=0)
        causal = torch.ones((width, width), dtype=torch.bool, device=self.device).tril()
        # Padding queries see themselves only, which keeps their (unused) outputs finite.
        visible = (causal[None] & valid[:, None, :]) | torch.eye(width, dtype=torch.bool, device=self.device)[None]
        mask = additive_mask(visible, self.dtype)
        cache.begin_prefill(dest, src, [len(s) for s in sequences], width)
        return self._forward(cache, ids, mask[:, None], positions, logits_to_keep=0 if all_logits else 1)

    def _forward(
        self,
        cache: SlotKVCache,
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """The model over `ids` with `cache` (its forward already begun); the cache's
        forward ends whatever happens. Returns the logits."""
        if self.single_thread_work > 0:
            self._set_threads(1 if self.parameters * ids.numel() < self.single_thread_work else 0)
        try:
            if self.lean is not None:
                return self.lean(ids, mask, positions, cache, logits_to_keep)
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=logits_to_keep,
            )
        finally:
            cache.end_forward()
        return out.logits

    def _set_threads(self, threads: int) -> None:
        """Run the next passes on `threads` intra-op threads (0: the pool's own size)."""
        if not self._pool_threads:
            self._pool_threads = self._threads_now = torch.get_num_threads()
        threads = threads or self._pool_threads
        if threads != self._threads_now:
            torch.set_num_threads(threads)
            self._threads_now = threads

    def decode(self, cache: SlotKVCache, tokens: torch.Tensor) -> torch.Tensor:
        """One step: feed token[r] to every cache row r at its next position. Returns
        logits [rows, V]."""
        positions, mask = cache.begin_decode()
        return self._forward(cache, tokens[:, None], mask, positions)[:, -1]

    def extend(self, cache: SlotKVCache, tokens: Sequence[Sequence[int]]) -> torch.Tensor:
        """Feed tokens[r] (at least one) to cache row r after what it holds, all rows in
        one pass. Returns the logits after each row's last token [rows, V]."""
        lengths = [len(t) for t in tokens]
        width = max(lengths)
        ids = torch.full((len(tokens), width), self.pad_id, dtype=torch.long)
        for row, seq in enumerate(tokens):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        positions, mask = cache.begin_extend(lengths)
        logits = self._forward(cache, ids.to(self.device), mask, positions)
        last = torch.tensor(lengths, dtype=torch.long, device=self.device) - 1
        return logits[torch.arange(len(tokens), device=self.device), last]

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
