import random

import pytest

from services.demo.task import OTHER_DIGIT_CREDIT, make_prompt, score


def test_score_rewards_the_asked_digit_most() -> None:
    assert score("7777", "7", 4) == 1.0
    assert score("7a7b", "7", 4) == 0.5
    assert score("1111", "7", 4) == OTHER_DIGIT_CREDIT
    assert score("abcd", "7", 4) == 0.0


def test_score_counts_missing_positions_as_zero() -> None:
    assert score("7", "7", 4) == 0.25
    assert score("", "7", 4) == 0.0
    assert score("777777", "7", 4) == 1.0  # only the first `length` positions count


def test_score_rejects_bad_length() -> None:
    with pytest.raises(ValueError):
        score("7", "7", 0)


def test_prompts_name_their_digit() -> None:
    rng = random.Random(1)
    prompts = [make_prompt(rng) for _ in range(200)]
    assert {p.digit for p in prompts} == set("0123456789")
    assert all(p.text == f"repeat {p.digit}:" for p in prompts)


def test_tokenizer_round_trips_prompts(tmp_path) -> None:
    from services.demo.tiny_model import build_tokenizer

    tok = build_tokenizer(tmp_path)
    ids = tok.encode("repeat 7: 777", add_special_tokens=False)
    assert len(ids) == len("repeat 7: 777")
    assert tok.decode(ids) == "repeat 7: 777"
    assert tok.eos_token_id not in ids
