"""The demo tasks: repeat a digit (the default), or reverse a digit string.

repeat: the prompt names a digit; the policy should answer with that digit, over and
over. A random-init model starts near chance (about 0.06 mean score); GRPO lifts it
towards 1.0 within a few hundred small steps on a CPU, so progress is visible in minutes.

reverse: the prompt carries a string of digits as long as the completion; the policy
should write it backwards. Every position of the completion is compared with the
reversed string, so the reward depends on the whole completion (a generation-heavy
workload: long completions, each token judged).
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

DIGITS = string.digits
OTHER_DIGIT_CREDIT = 0.1
TASKS = ("repeat", "reverse")


@dataclass(frozen=True)
class Prompt:
    text: str
    digit: str
    target: str = ""  # reverse: the reversed digit string the completion should be


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


def make_reverse_prompt(rng: random.Random, length: int) -> Prompt:
    """A prompt with `length` random digits; its target is them reversed."""
    if length <= 0:
        raise ValueError("length must be positive")
    digits = "".join(rng.choice(DIGITS) for _ in range(length))
    return Prompt(text=f"reverse {digits}:", digit="", target=digits[::-1])


def score_reverse(completion: str, target: str) -> float:
    """Mean over the target's positions: 1 where the completion has the target's digit,
    partial credit for another digit, 0 otherwise (missing positions count 0; what
    follows the target's length is ignored)."""
    if not target:
        raise ValueError("target must not be empty")
    total = 0.0
    for ch, want in zip(completion, target):
        if ch == want:
            total += 1.0
        elif ch in DIGITS:
            total += OTHER_DIGIT_CREDIT
    return total / len(target)


@dataclass(frozen=True)
class Task:
    """One demo task at one completion length: prompts and their scores."""

    name: str
    length: int

    def __post_init__(self) -> None:
        if self.name not in TASKS:
            raise ValueError(f"unknown task {self.name!r}; choose from {', '.join(TASKS)}")
        if self.length <= 0:
            raise ValueError("length must be positive")

    def prompt(self, rng: random.Random) -> Prompt:
        return make_prompt(rng) if self.name == "repeat" else make_reverse_prompt(rng, self.length)

    def score(self, completion: str, prompt: Prompt) -> float:
        if self.name == "repeat":
            return score(completion, prompt.digit, self.length)
        return score_reverse(completion, prompt.target)

    def max_token_length(self) -> int:
        """Longest sequence (prompt and completion, one token per character)."""
        longest_prompt = len("repeat 0:") if self.name == "repeat" else len("reverse :") + self.length
        return longest_prompt + self.length
