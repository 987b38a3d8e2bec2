"""json_guard: the nesting and lone-surrogate checks every gateway route shares."""

from __future__ import annotations

import json

from services.gateway.http.json_guard import MAX_JSON_DEPTH, body_problem


def deep(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_ordinary_bodies_pass() -> None:
    ok = [
        {"text": "hi \U0001f600", "sampling_params": {"max_new_tokens": 2}},
        {"input_ids": [[1, 2, 3]] * (MAX_JSON_DEPTH * 4)},  # many brackets, shallow
        {"messages": [{"role": "user", "content": "[[[[{{{{"}]},  # brackets inside strings
        {"a": json.loads(deep(MAX_JSON_DEPTH - 1))},
    ]
    for body in ok:
        assert body_problem(json.dumps(body).encode()) is None, body
    # A valid surrogate pair spelled as escapes is one character, not a lone surrogate.
    assert body_problem(b'{"text": "\\ud83d\\ude00", "pad": "\\\\ud800"}') is None
    assert body_problem(b"not json \\ud800") is None  # the route answers what is not JSON


def test_nesting_names_the_field() -> None:
    body = '{"model": "m", "messages": [{"role": "user", "content": ' + deep(MAX_JSON_DEPTH) + "}]}"
    problem = body_problem(body.encode())
    assert problem is not None
    field, message = problem
    assert field.startswith("messages[0].content[0]") and field.endswith("...")
    assert message == f"{field}: JSON nested deeper than {MAX_JSON_DEPTH} levels"
    problem = body_problem(('[1, "]]", ' + deep(100_000) + "]").encode())
    assert problem is not None
    field, _ = problem
    assert field.startswith("[2][0]")
    keys = '{"a": 1, "b\\"]": 2, "c": ' + deep(MAX_JSON_DEPTH) + "}"
    problem = body_problem(keys.encode())
    assert problem is not None
    assert problem[0].startswith("c[0]")


def test_lone_surrogates_name_the_field() -> None:
    body = json.dumps({"text": ["ok", "a\udc00"], "x": {"k\ud800": 1}}).encode()
    problem = body_problem(body)
    assert problem is not None
    field, message = problem
    assert field == "text[1]"
    assert "\\udc00 at character 1" in message
    problem = body_problem(json.dumps({"x": {"k\ud800": 1}}).encode())
    assert problem is not None
    field, message = problem
    assert field == "x.k\\ud800"
    message.encode("utf-8")  # the answer itself can be encoded
