"""The demo task: repeat a digit.

The prompt names a digit; the policy should answer with that digit, over and over. A
random-init model starts near chance (about 0.06 mean score); GRPO lifts it towards 1.0
within a few hundred small steps on a CPU, so progress is visible in minutes.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

DIGITS = string.digits
OTHER_DIGIT_CREDIT = 0.1


@dataclass(frozen=True)
class Prompt:
    text: str
    digit: str


def make_prompt(rng: random.Random) -> Prompt:
    digit = rng.choice(DIGITS)
    return Prompt(text=f"repeat {digit}:", digit=digit)


def score(completion: str, digit: str, length: int) -> float:
    """Mean over `length` positions: 1 for the asked digit, partial credit for another
    digit, 0 otherwise (missing positions, after an early stop, count 0)."""
    if length <= 0:
        raise ValueError("length must be positive")
    total = 0.0
    for ch in completion[:length]:
        if ch == digit:
            total += 1.0
        elif ch in DIGITS:
            total += OTHER_DIGIT_CREDIT
    return total / length
