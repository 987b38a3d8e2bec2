"""The forward pass of a Llama-architecture model as the engine runs it, without the
Hugging Face module machinery around each layer.

On a small model the tensor work of a decode step is a few hundred microseconds and the
transformers wrappers around it (keyword deprecation and output capture decorators,
per-layer module calls, mask preparation, output dataclasses) cost as much again. This
runs the same torch operations, on the model's own parameters, in the same order and
with the same shapes, so its logits are bit-for-bit those of `model(...)` (a test holds
it to that on prefill, decode and extend passes); the engine uses it only where it
applies and calls the model otherwise.

It applies to LlamaForCausalLM with the sdpa attention, default rotary embedding,
silu MLP, multi-head attention (as many key/value heads as heads) and one tensor-parallel
shard, in eval mode: what `clotho build-model` writes. It reads the parameters on every
call, so weight commits (copied or adopted) are seen at once.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from services.inference.torch_engine.kv_cache import SlotKVCache


class LeanLlama:
    """Logits of a LlamaForCausalLM over explicit positions, a 4D additive mask and a
    SlotKVCache (its pass begun by the caller)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        config = model.config
        self.heads = int(config.num_attention_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.heads)
        self.scaling = self.head_dim**-0.5
        self.layers = list(model.model.layers[: config.num_hidden_layers])
        self.rotary = model.model.rotary_emb

    @staticmethod
    def supports(model: Any) -> bool:
        """Whether `model` is one this forward reproduces exactly."""
        if type(model).__name__ != "LlamaForCausalLM" or model.training:
            return False
        config = model.config
        rope = getattr(config, "rope_parameters", None) or {}
        inner = getattr(model, "model", None)
        return bool(
            getattr(config, "_attn_implementation", None) == "sdpa"
            and rope.get("rope_type", "default") == "default"
            and getattr(config, "hidden_act", None) == "silu"
            and int(getattr(config, "pretraining_tp", 1) or 1) == 1
            and int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
            == int(config.num_attention_heads)
            and inner is not None
            and type(inner).__name__ == "LlamaModel"
            and getattr(inner.rotary_emb, "rope_type", "default") == "default"
        )

    def __call__(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: SlotKVCache,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        model = self.model
        hidden = F.embedding(ids, model.model.embed_tokens.weight)
        cos, sin = self._rotary(hidden, positions)
        batch, length = ids.shape
        shape = (batch, length, -1, self.head_dim)
        for index, layer in enumerate(self.layers):
            attn = layer.self_attn
            residual = hidden
            x = _rms_norm(hidden, layer.input_layernorm)
            q = F.linear(x, attn.q_proj.weight, attn.q_proj.bias).view(shape).transpose(1, 2)
            k = F.linear(x, attn.k_proj.weight, attn.k_proj.bias).view(shape).transpose(1, 2)
            v = F.linear(x, attn.v_proj.weight, attn.v_proj.bias).view(shape).transpose(1, 2)
            q = (q * cos) + (_rotate_half(q) * sin)
            k = (k * cos) + (_rotate_half(k) * sin)
            k, v = cache.update(k, v, index)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, scale=self.scaling)
            out = out.transpose(1, 2).contiguous()
            out = out.reshape(batch, length, -1).contiguous()
            hidden = residual + F.linear(out, attn.o_proj.weight, attn.o_proj.bias)
            residual = hidden
            x = _rms_norm(hidden, layer.post_attention_layernorm)
            mlp = layer.mlp
            gate = mlp.act_fn(F.linear(x, mlp.gate_proj.weight, mlp.gate_proj.bias))
            x = F.linear(
                gate * F.linear(x, mlp.up_proj.weight, mlp.up_proj.bias), mlp.down_proj.weight, mlp.down_proj.bias
            )
            hidden = residual + x
        hidden = _rms_norm(hidden, model.model.norm)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:, :]
        return F.linear(hidden, model.lm_head.weight, model.lm_head.bias)

    def _rotary(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin per position as LlamaRotaryEmbedding computes them, shaped to
        broadcast over heads."""
        rotary = self.rotary
        freqs = positions[..., None].float() * rotary.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * rotary.attention_scaling
        sin = emb.sin() * rotary.attention_scaling
        return cos.to(dtype=x.dtype).unsqueeze(1), sin.to(dtype=x.dtype).unsqueeze(1)


def _rms_norm(hidden: torch.Tensor, norm: Any) -> torch.Tensor:
    dtype = hidden.dtype
    x = hidden.to(torch.float32)
    variance = x.pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + norm.variance_epsilon)
    return norm.weight * x.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
