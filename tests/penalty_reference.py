"""The reference for sampling penalties: greedy decoding of a plain transformers model
with the penalties applied as SamplingParams documents them, recomputing the whole
sequence each step (no cache)."""

from __future__ import annotations

import torch


def penalise(
    logits: torch.Tensor, prompt: list[int], output: list[int], frequency: float, presence: float, repetition: float
) -> torch.Tensor:
    """Repetition over prompt + output (CTRL style), then frequency * count and
    presence * (count > 0) over the output only."""
    logits = logits.clone()
    for t in set(prompt) | set(output):
        v = float(logits[t])
        logits[t] = v / repetition if v > 0 else v * repetition
    for t in set(output):
        logits[t] -= frequency * output.count(t) + presence
    return logits


@torch.no_grad()
def penalised_greedy(
    model, prompt: list[int], steps: int, frequency: float = 0.0, presence: float = 0.0, repetition: float = 1.0
) -> tuple[list[int], list[float]]:
    """The tokens chosen, and each one's unpenalised log-probability (the policy's)."""
    ids = list(prompt)
    logprobs = []
    for _ in range(steps):
        logits = model(torch.tensor([ids])).logits[0, -1].float()
        token = int(penalise(logits, prompt, ids[len(prompt) :], frequency, presence, repetition).argmax())
        logprobs.append(float(torch.log_softmax(logits, -1)[token]))
        ids.append(token)
    return ids[len(prompt) :], logprobs


def penalised_greedy_ids(
    model, prompt: list[int], steps: int, frequency: float = 0.0, presence: float = 0.0, repetition: float = 1.0
) -> list[int]:
    """The tokens `penalised_greedy` chooses."""
    return penalised_greedy(model, prompt, steps, frequency, presence, repetition)[0]
