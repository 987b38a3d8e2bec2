"""Choosing the next token of every row of a batch, each row with its own parameters."""

from __future__ import annotations

from typing import Sequence

import torch


def choose_tokens(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor,
    generators: Sequence[torch.Generator],
) -> torch.Tensor:
    """Next token per row of `logits` [B, V] (float32).

    Rows with temperature 0 take the argmax. The others sample from softmax(logits / T)
    restricted to the top_k most likely tokens (0 = all) and to the smallest set whose
    mass reaches top_p. Rows that share a generator object draw in row order from it, so
    a seeded request is reproducible whatever else is in the batch.
    """
    tokens = logits.argmax(dim=-1)
    rows = (temperature > 0).nonzero().flatten()
    if rows.numel() == 0:
        return tokens
    scaled = logits[rows] / temperature[rows, None]
    k = top_k[rows]
    p = top_p[rows]
    vocab = scaled.shape[-1]
    if bool((k > 0).any()) or bool((p < 1).any()):
        scaled, order = scaled.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=scaled.device)
        k = torch.where(k > 0, k, vocab)
        scaled = scaled.masked_fill(ranks[None, :] >= k[:, None], float("-inf"))
        probs = torch.softmax(scaled, dim=-1)
        # Drop a token once the tokens ranked above it already reach top_p; the most
        # likely token always stays.
        above = probs.cumsum(dim=-1) - probs
        probs = probs.masked_fill(above >= p[:, None], 0.0)
    else:
        order = None
        probs = torch.softmax(scaled, dim=-1)

    picks = torch.empty(rows.numel(), dtype=torch.long, device=logits.device)
    groups: dict[int, list[int]] = {}
    row_list = rows.tolist()
    for i, row in enumerate(row_list):
        groups.setdefault(id(generators[row]), []).append(i)
    for members in groups.values():
        gen = generators[row_list[members[0]]]
        idx = torch.tensor(members, device=logits.device)
        picks[idx] = torch.multinomial(probs[idx], 1, generator=gen).squeeze(-1)
    if order is not None:
        picks = order.gather(-1, picks[:, None]).squeeze(-1)
    tokens[rows] = picks
    return tokens
