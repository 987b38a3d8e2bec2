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


def test_reverse_prompts_carry_the_reversed_string() -> None:
    from services.demo.task import make_reverse_prompt

    rng = random.Random(3)
    for length in (1, 4, 32):
        p = make_reverse_prompt(rng, length)
        digits = p.text.removeprefix("reverse ").removesuffix(":")
        assert len(digits) == length and set(digits) <= set("0123456789")
        assert p.target == digits[::-1]
    with pytest.raises(ValueError):
        make_reverse_prompt(rng, 0)


def test_score_reverse_judges_every_position() -> None:
    from services.demo.task import score_reverse

    assert score_reverse("4321", "4321") == 1.0
    assert score_reverse("1234", "4321") == pytest.approx(4 * OTHER_DIGIT_CREDIT / 4)
    assert score_reverse("4399", "4321") == pytest.approx((2 + 2 * OTHER_DIGIT_CREDIT) / 4)
    assert score_reverse("43", "4321") == 0.5  # missing positions count 0
    assert score_reverse("4321xyz", "4321") == 1.0  # only the target's length counts
    assert score_reverse("ab21", "4321") == 0.5
    # The last position matters as much as the first: the whole completion is judged.
    assert score_reverse("4320", "4321") < score_reverse("4321", "4321")
    with pytest.raises(ValueError):
        score_reverse("1", "")


def test_task_selects_prompts_and_scores() -> None:
    from services.demo.task import Task

    rng = random.Random(0)
    repeat = Task("repeat", 4)
    p = repeat.prompt(rng)
    assert p.text == f"repeat {p.digit}:"
    assert repeat.score(p.digit * 4, p) == 1.0
    reverse = Task("reverse", 32)
    q = reverse.prompt(rng)
    assert len(q.target) == 32
    assert reverse.score(q.target, q) == 1.0
    assert reverse.max_token_length() == len(q.text) + 32
    assert repeat.max_token_length() == len(p.text) + 4
    with pytest.raises(ValueError):
        Task("sort", 4)
    with pytest.raises(ValueError):
        Task("reverse", 0)
