"""Choosing the next token of every row of a batch, each row with its own parameters."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def choose_tokens(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor,
    generators: Sequence[torch.Generator],
    keys: Sequence[tuple[int, int]] | None = None,
) -> torch.Tensor:
    """Next token per row of `logits` [B, V] (float32).

    Rows with temperature 0 take the argmax. The others sample from softmax(logits / T)
    restricted to the top_k most likely tokens (0 = all) and to the smallest set whose
    mass reaches top_p. Rows that share a generator object draw from it in the order of
    their `keys` (row order when absent), so a seeded request is reproducible whatever
    else is in the batch and wherever its rows sit.
    """
    tokens = logits.argmax(dim=-1)
    rows = (temperature > 0).nonzero().flatten()
    if rows.numel() == 0:
        return tokens
    scaled = logits[rows] / temperature[rows, None]
    k = top_k[rows]
    p = top_p[rows]
    vocab = scaled.shape[-1]
    # Each row's distribution, and how its sampled index maps to a token, depend on that
    # row alone (never on which other rows share the batch): rows with a top-k/top-p
    # filter sample over their sorted probabilities, the others over the vocabulary.
    filtered = (k > 0) | (p < 1)
    probs = torch.empty_like(scaled)
    sorted_rows = filtered.nonzero().flatten()
    plain_rows = (~filtered).nonzero().flatten()
    order = None
    if sorted_rows.numel():
        values, order = scaled[sorted_rows].sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=scaled.device)
        kk = k[sorted_rows]
        kk = torch.where(kk > 0, kk, vocab)
        values = values.masked_fill(ranks[None, :] >= kk[:, None], float("-inf"))
        sorted_probs = torch.softmax(values, dim=-1)
        # Drop a token once the tokens ranked above it already reach top_p; the most
        # likely token always stays.
        above = sorted_probs.cumsum(dim=-1) - sorted_probs
        probs[sorted_rows] = sorted_probs.masked_fill(above >= p[sorted_rows, None], 0.0)
    if plain_rows.numel():
        probs[plain_rows] = torch.softmax(scaled[plain_rows], dim=-1)

    picks = torch.empty(rows.numel(), dtype=torch.long, device=logits.device)
    groups: dict[int, list[int]] = {}
    row_list = rows.tolist()
    for i, row in enumerate(row_list):
        groups.setdefault(id(generators[row]), []).append(i)
    for members in groups.values():
        if keys is not None and len(members) > 1:
            members.sort(key=lambda i: keys[row_list[i]])
        gen = generators[row_list[members[0]]]
        idx = torch.tensor(members, device=logits.device)
        picks[idx] = torch.multinomial(probs[idx], 1, generator=gen).squeeze(-1)
    if order is not None:
        picks[sorted_rows] = order.gather(-1, picks[sorted_rows][:, None]).squeeze(-1)
    tokens[rows] = picks
    return tokens


def sample_plain(
    logits: torch.Tensor, temperature: torch.Tensor, generator: torch.Generator, order: torch.Tensor | None
) -> torch.Tensor:
    """`choose_tokens` for the common batch where every row samples (temperature > 0)
    from its whole softmax (no top-k, no top-p) with one shared generator: the same
    operations on the same values, without the per-row dispatch. `order` lists the rows
    in their keys' order (the order they draw in; None: row order)."""
    probs = torch.softmax(logits / temperature[:, None], dim=-1)
    if order is None:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    tokens[order] = torch.multinomial(probs[order], 1, generator=generator).squeeze(-1)
    return tokens
