"""The C fast path of /scored_data ingest (services/gateway/trajectory/_scored_fast.c) against the
pydantic path it stands in for: whenever it answers, its answer is the Python path's
byte for byte; whatever the Python path rejects, it declines (None); bodies written by
Python's json are within its domain; and no mutated body crashes it."""

from __future__ import annotations

import json
import random
import re
import struct
from typing import Any

import pytest

from services.gateway.trajectory.receipts import completion_tokens
from services.gateway.trajectory.scored_data import (
    ScoredDataInvalid,
    encode_group,
    incoming,
    parse_scored_data,
    parse_scored_data_list,
)

try:
    from services.gateway.trajectory import _scored_fast
except ImportError as exc:  # pragma: no cover - reported by every test below
    _scored_fast = None
    _IMPORT_ERROR = repr(exc)

NOT_BUILT = (
    "the C fast path was not built: needs a C compiler and Python headers "
    "(rebuild with `.venv/bin/pip install --no-deps -e .`)"
)

I32_MIN, I32_MAX = -(2**31), 2**31 - 1
I64_MIN, I64_MAX = -(2**63), 2**63 - 1
FREE_FORM = ("messages", "generation_params", "overrides", "group_overrides", "images")


@pytest.fixture(scope="module")
def fast():
    if _scored_fast is None:
        pytest.fail(f"{NOT_BUILT}: {_IMPORT_ERROR}")
    return _scored_fast


def test_the_extension_is_built():
    assert _scored_fast is not None, NOT_BUILT


# --- the reference ----------------------------------------------------------------


def summary(group: dict, want: bool) -> tuple:
    """What canonical_group answers, computed with the Python path: the Incoming the
    state would get from it (policy_versions [] means none given: None)."""
    got = incoming(group, want)
    expected_completions = None
    if want:
        expected_completions = tuple(completion_tokens(t, m) for t, m in zip(group["tokens"], group["masks"]))
    completions = None if got.completions is None else tuple(got.completions)
    assert completions == expected_completions
    assert got.body == encode_group(group)
    return (
        got.body,
        got.size,
        got.env_id,
        None if got.policy_versions is None else tuple(got.policy_versions),
        completions,
    )


NUMBER = re.compile(rb"-?[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")


def significant_digits(literal: bytes) -> int:
    mantissa = re.split(rb"[eE]", literal)[0].lstrip(b"-").replace(b".", b"")
    return len(mantissa.strip(b"0"))


def same_but_float_spelling(got: bytes, expected: bytes) -> bool:
    """The documented exception: a 16-17 digit float keeps the producer's digits when
    they are not the shortest round-trip ones; same value, another spelling."""
    if NUMBER.split(got) != NUMBER.split(expected):
        return False
    for a, b in zip(NUMBER.findall(got), NUMBER.findall(expected)):
        if a != b and (float(a) != float(b) or significant_digits(a) < 16):
            return False
    return True


def assert_same(got: tuple, expected: tuple, body: bytes, exact: bool) -> None:
    if exact or got[0] == expected[0]:
        assert got == expected, body[:300]
    else:
        assert got[1:] == expected[1:], body[:300]
        assert same_but_float_spelling(got[0], expected[0]), (body[:300], got[0][:300], expected[0][:300])


def check(fast, body: bytes, *, many: bool = False, must_handle: bool = False, exact: bool = True) -> Any:
    """canonical_group(body) (canonical_groups(body) when `many`: a list of groups) is
    None or equals the Python path (which then accepts), group by group. The result is
    the extension's own (a tuple, a list of them, or None), untyped as the module is.
    exact=False allows the documented float spelling exception (mutated digits)."""
    want = random.random() < 0.5
    what = "a list" if many else "a body"
    got = (fast.canonical_groups if many else fast.canonical_group)(body, want)
    if must_handle:
        assert got is not None, f"the fast path declined {what} written by json: {body[:300]!r}"
    if got is not None:
        try:
            groups = parse_scored_data_list(body) if many else [parse_scored_data(body)]
        except ScoredDataInvalid as exc:
            raise AssertionError(f"fast path accepted {what} Python rejects ({exc}): {body[:300]!r}")
        answers = got if many else [got]
        assert len(answers) == len(groups)
        for one, group in zip(answers, groups):
            assert_same(one, summary(group, want), body, exact)
    return got


# --- generated bodies -------------------------------------------------------------


def f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def rand_int(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.1:
        return rng.choice([I32_MIN, I32_MAX, 0, -1, 1, -100, I32_MIN + 1, I32_MAX - 1])
    if r < 0.5:
        return rng.randrange(32000)
    return rng.randint(I32_MIN, I32_MAX)


SPECIAL_FLOATS = [
    0.0,
    -0.0,
    1.0,
    -1.0,
    0.5,
    -0.5,
    1e-5,
    -1e-5,
    1e-7,
    1.5e-5,
    1e-4,
    0.0001234,
    1e15,
    1e16,
    1.5e16,
    1e22,
    -1e22,
    1e100,
    1e-100,
    1.7976931348623157e299,
    2.5e-300,
    123456789012345.0,
    0.1,
    0.2,
    0.30000000000000004,
    1 / 3,
    2 / 3,
    9007199254740993.0,
    5e-5,
    9.999999999999999e-5,
]


def rand_float(rng: random.Random):
    r = rng.random()
    if r < 0.15:
        return rng.choice(SPECIAL_FLOATS)
    if r < 0.25:
        return rng.randint(-(10**15) + 1, 10**15 - 1) if rng.random() < 0.3 else rng.randint(-1000, 1000)
    if r < 0.55:
        return f32(-rng.expovariate(1.0))  # float32 logprobs: 17-digit shortest doubles
    if r < 0.8:
        return (rng.random() - 0.5) * 10 ** rng.randint(-12, 18)
    return rng.random()


TRICKY_FLOATS = [
    1e-05,
    1e16,
    0.1,
    -0.0,
    0.0,
    1.0,
    1e-07,
    1.5e-05,
    1e-300,
    1e299,
    1e22,
    1e15,
    0.0001,
    0.00012,
    123456.789,
    -2.5,
    9.999999999999999e-05,
    0.30000000000000004,
    1 / 3,
    1e100,
]
FLAT_STRINGS = ["", "x", "openai", "e-", "0.00001", "a b/c:d", "~", "{[,:]}", "1e-05", "null", " "]


def rand_scalar(rng: random.Random):
    """A value the fast path copies in a flat free-form object: an ASCII string
    without escapes, a literal, an int64, or a float (ints stay ints there)."""
    r = rng.random()
    if r < 0.25:
        return rng.choice(FLAT_STRINGS)
    if r < 0.35:
        return rng.choice([None, True, False])
    if r < 0.55:
        return rng.choice([0, 1, -1, 8, 10**15, -(10**18), I64_MAX, I64_MIN, I32_MAX + 1, rng.randrange(10**6)])
    if r < 0.75:
        return rng.choice(TRICKY_FLOATS)
    return float(rand_float(rng))


def rand_flat_object(rng: random.Random) -> dict:
    """generation_params / group_overrides as the fast path takes them."""
    r = rng.random()
    if r < 0.25:
        return {}
    if r < 0.4:
        return rng.choice([{"server_type": "openai"}, {"group_size": 8}, {"server_type": "vllm", "group_size": 2}])
    n = 64 if r < 0.45 else rng.randint(1, 6)
    keys = rng.sample(["k%d" % i for i in range(80)] + ["", "e-", "a b", "0.0000", "temperature", "max_tokens"], n)
    return {k: rand_scalar(rng) for k in keys}


def basenv_default(g: dict, rng: random.Random) -> dict:
    """Atropos' BaseEnv default collect_trajectories: the optional per-sequence lists
    start as [] and stay empty, group_overrides merges the items' (often {})."""
    g.update(advantages=[], ref_logprobs=[], messages=[], overrides=[], images=[])
    g["group_overrides"] = rng.choice([{}, {}, {"server_type": "openai"}, {"group_size": len(g["tokens"])}])
    g.pop("inference_logprobs", None)
    return g


def rand_value(rng: random.Random, depth: int = 0):
    """A JSON value of the kinds the fast path skips (ASCII strings, no escapes)."""
    r = rng.random()
    if depth < 4 and r < 0.2:
        return [rand_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if depth < 4 and r < 0.35:
        return {f"k{i}": rand_value(rng, depth + 1) for i in range(rng.randrange(4))}
    return rng.choice([None, True, False, 0, -7, 12.5, 1e-9, 10**30, "", "text", "a b/c:d"])


def rand_group(rng: random.Random) -> dict:
    n = rng.randint(1, 5)
    lens = [rng.choice([0, 1, 2, 3, 7, 20]) for _ in range(n)]
    tokens = [[rand_int(rng) for _ in range(k)] for k in lens]
    masks = [[-100 if rng.random() < 0.4 else t for t in row] for row in tokens]
    g: dict = {"tokens": tokens, "masks": masks, "scores": [rand_float(rng) for _ in range(n)]}

    def maybe(key, make):
        r = rng.random()
        if r < 0.4:
            g[key] = make()
        elif r < 0.6:
            g[key] = None

    def per_sequence(make):
        # [] means none given (scored_data.group_problems), whatever the count.
        return (list) if rng.random() < 0.25 else make

    for key in ("advantages", "ref_logprobs", "inference_logprobs"):
        maybe(key, per_sequence(lambda: [[rand_float(rng) for _ in range(k)] for k in lens]))
    shapes = [[rng.randrange(4) for _ in range(rng.randrange(3))] for _ in range(n)]
    maybe("distill_token_ids", per_sequence(lambda: [[[rand_int(rng) for _ in range(k)] for k in s] for s in shapes]))
    maybe("distill_logprobs", per_sequence(lambda: [[[rand_float(rng) for _ in range(k)] for k in s] for s in shapes]))
    maybe("env_id", lambda: rng.choice([0, 1, 42, I64_MAX, I64_MIN, -5, rng.randrange(2**40)]))
    maybe(
        "policy_versions",
        per_sequence(lambda: [rng.choice([None, 0, 1, 17, 2**63 - 1, rng.randrange(10**6)]) for _ in range(n)]),
    )
    for key in FREE_FORM:
        r = rng.random()
        if r < 0.2:
            g[key] = None
        elif r < 0.5:
            if key in ("generation_params", "group_overrides"):
                g[key] = rand_flat_object(rng)
            elif key == "images":
                g[key] = rng.choice([[], {}])
            else:
                g[key] = []
    if rng.random() < 0.15:
        basenv_default(g, rng)
    if rng.random() < 0.3:
        for i in range(rng.randint(1, 3)):
            g[f"extra_{i}"] = rand_value(rng)
    items = list(g.items())
    rng.shuffle(items)
    return dict(items)


def dumps(value, rng: random.Random) -> bytes:
    style = rng.randrange(4)
    if style == 0:
        return json.dumps(value, separators=(",", ":")).encode()
    if style == 1:
        return json.dumps(value).encode()
    if style == 2:
        return json.dumps(value, indent=2).encode()
    return spaced(json.dumps(value, separators=(",", ":")), rng).encode()


def spaced(text: str, rng: random.Random) -> str:
    """Random JSON whitespace between the tokens of compact JSON (none in strings)."""
    out = [rng.choice(["", " ", "\n", "\t \r\n"])]
    in_string = False
    for ch in text:
        out.append(ch)
        if ch == '"':
            in_string = not in_string
        if not in_string and ch in "[]{},:" and rng.random() < 0.3:
            out.append(rng.choice([" ", "\n", "\t", "\r\n  "]))
    out.append(rng.choice(["", " ", "\n"]))
    return "".join(out)


def test_json_bodies_are_handled_and_equal_the_python_path(fast):
    rng = random.Random(1234)
    random.seed(99)
    for _ in range(400):
        body = dumps(rand_group(rng), rng)
        check(fast, body, must_handle=True)


def test_lists_are_handled_and_equal_the_python_path(fast):
    rng = random.Random(4321)
    random.seed(98)
    assert fast.canonical_groups(b"[]", False) == []
    assert fast.canonical_groups(b" [ ] \n", True) == []
    for _ in range(60):
        body = dumps([rand_group(rng) for _ in range(rng.randint(1, 4))], rng)
        got = check(fast, body, many=True, must_handle=True)
        assert len(got) == len(json.loads(body))
    # One group outside the domain declines the whole list (the Python path decides).
    good = {"tokens": [[1]], "masks": [[1]], "scores": [1.0]}
    messages = [[{"role": "user", "content": "hi"}]]
    assert fast.canonical_groups(json.dumps([good, {**good, "messages": messages}]).encode(), False) is None
    assert fast.canonical_groups(json.dumps([good, {**good, "scores": []}]).encode(), False) is None
    assert fast.canonical_groups(json.dumps(good).encode(), False) is None  # not a list
    assert fast.canonical_group(json.dumps([good]).encode(), False) is None  # not an object


def respell(x: float, rng: random.Random) -> str:
    """Another JSON spelling of a float with at most 15 significant digits."""
    mantissa, _, exp = f"{x:.14e}".partition("e")
    digits = mantissa.replace("-", "").replace(".", "").rstrip("0") or "0"
    sign = "-" if mantissa.startswith("-") else ""
    e = int(exp) - (len(digits) - 1)  # x == sign digits * 10**e
    shift = rng.randint(0, 5)
    whole = digits + "0" * rng.randint(0, 2) if digits != "0" else digits
    e -= len(whole) - len(digits)
    if rng.random() < 0.5:  # fraction form: digits with a decimal point
        point = max(1, len(whole) - shift)
        lit = whole[:point] + "." + whole[point:] if point < len(whole) else whole + ".0"
        e += len(whole) - point if point < len(whole) else 0
    else:
        lit = whole
    marker = rng.choice(["e", "E"])
    plus = rng.choice(["", "+"]) if e >= 0 else ""
    lead = "0" * rng.randint(0, 2)
    return f"{sign}{lit}{marker}{plus}{'-' if e < 0 else ''}{lead}{abs(e)}"


def test_other_spellings_of_floats_give_repr(fast):
    rng = random.Random(7)
    for _ in range(600):
        x = rng.choice([rng.random(), -rng.random() * 1e-6, rng.uniform(-1e20, 1e20), rng.choice(SPECIAL_FLOATS)])
        x = float(f"{x:.{rng.randint(1, 15)}g}")
        lit = respell(x, rng)
        assert float(lit) == x, (lit, x)
        body = b'{"tokens":[[1]],"masks":[[1]],"scores":[%s]}' % lit.encode()
        got = check(fast, body, must_handle=True)
        assert got[0].split(b'"scores":[')[1].split(b"]")[0] == repr(x).encode()
    for lit, expected in [
        ("5", "5.0"),
        ("-5", "-5.0"),
        ("0", "0.0"),
        ("1E5", "100000.0"),
        ("1e+16", "1e+16"),
        ("1e15", "1000000000000000.0"),
        ("0.00001", "1e-05"),
        ("0.0001", "0.0001"),
        ("-0.0", "-0.0"),
        ("-0e7", "-0.0"),
        ("0e-999999999999", "0.0"),
        ("1.50", "1.5"),
        ("100e-2", "1.0"),
        ("1e-300", "1e-300"),
        ("1e299", "1e+299"),
        ("9.5e-301", "9.5e-301"),
        ("0.5e0", "0.5"),
        ("123456789012345", "123456789012345.0"),
        ("1e22", "1e+22"),
        ("12.5e-1", "1.25"),
    ]:
        body = b'{"tokens":[[1]],"masks":[[1]],"scores":[%s]}' % lit.encode()
        got = check(fast, body, must_handle=True)
        assert b'"scores":[%s]' % expected.encode() in got[0], (lit, got[0][:80])


def test_completions_size_env_and_policy_versions(fast):
    body = json.dumps(
        {
            "tokens": [[5, 6, 7, 8], [9, 10]],
            "masks": [[-100, -100, 7, 8], [-100, 10]],
            "scores": [1, 0.5],
            "env_id": 3,
            "policy_versions": [None, 12],
        }
    ).encode()
    enc, size, env_id, pv, completions = fast.canonical_group(body, True)
    assert (size, env_id, pv, completions) == (2, 3, (None, 12), ((7, 8), (10,)))
    assert enc.endswith(b',"policy_versions":[null,12]}')
    assert fast.canonical_group(body, False)[4] is None
    with pytest.raises(TypeError):
        fast.canonical_group(body.decode(), False)
    with pytest.raises(TypeError):
        fast.canonical_groups(bytearray(body), False)


BASE = {"tokens": [[1, 2], [3]], "masks": [[-100, 2], [3]], "scores": [1.0, 0.0]}


def body_with(**fields) -> bytes:
    group = {**BASE, **fields}
    return json.dumps({k: v for k, v in group.items() if v is not _DROP}).encode()


_DROP = object()
B = b'{"tokens":[[1,2],[3]],"masks":[[-100,2],[3]],"scores":[1.0,0.0]'


def with_score(literal: bytes) -> bytes:
    """B with its second score spelt `literal`."""
    return B.replace(b"[1.0,0.0]", b"[1.0," + literal + b"]") + b"}"


# Bodies the Python path rejects (checked below): the fast path must decline them.
INVALID = {
    "tokens string": body_with(tokens="x"),
    "tokens flat": body_with(tokens=[1, 2]),
    "float in tokens": body_with(tokens=[[1.5, 2], [3]]),
    "token over int32": body_with(tokens=[[2**31, 2], [3]]),
    "token under int32": body_with(tokens=[[-(2**31) - 1, 2], [3]]),
    "huge token": body_with(tokens=[[10**30, 2], [3]]),
    "ten digits over int32": body_with(tokens=[[2147483650, 2], [3]]),
    "ten digits under int32": body_with(tokens=[[-2147483650, 2], [3]]),
    "ten nines": body_with(tokens=[[9999999999, 2], [3]]),
    "eleven digits": body_with(masks=[[-100, 10000000000], [3]]),
    "mask over int32": body_with(masks=[[-100, 2**31], [3]]),
    "null token": body_with(tokens=[[None, 2], [3]]),
    "masks row short": body_with(masks=[[2], [3]]),
    "masks rows": body_with(masks=[[-100, 2]]),
    "scores count": body_with(scores=[1.0]),
    "scores nested": body_with(scores=[[1.0], [0.0]]),
    "score string": body_with(scores=["a", 1.0]),
    "score null": body_with(scores=[None, 1.0]),
    "no tokens": body_with(tokens=_DROP),
    "no masks": body_with(masks=_DROP),
    "no scores": body_with(scores=_DROP),
    "null tokens": body_with(tokens=None),
    "null masks": body_with(masks=None),
    "null scores": body_with(scores=None),
    "no sequence": body_with(tokens=[], masks=[], scores=[]),
    "advantages row": body_with(advantages=[[1.0], [2.0]]),
    "advantages count": body_with(advantages=[[1.0, 2.0]]),
    "ref_logprobs flat": body_with(ref_logprobs=[1.0, 2.0]),
    "inference_logprobs row": body_with(inference_logprobs=[[-0.5, -0.5], []]),
    "policy_versions count": body_with(policy_versions=[1]),
    "policy_versions negative": body_with(policy_versions=[-1, 2]),
    "policy_versions over u64": body_with(policy_versions=[2**64, 2]),
    "policy_versions float": body_with(policy_versions=[1.5, 2]),
    "env_id string": body_with(env_id="e"),
    "env_id float": body_with(env_id=1.5),
    "distill positions": body_with(distill_token_ids=[[[1]], [[2]]], distill_logprobs=[[[1.0], [2.0]], [[2.0]]]),
    "distill inner": body_with(distill_token_ids=[[[1, 2]], [[2]]], distill_logprobs=[[[1.0]], [[2.0]]]),
    "distill count": body_with(distill_token_ids=[[[1]]]),
    "distill token over int32": body_with(distill_token_ids=[[[2**31]], [[1]]]),
    "messages not a list": body_with(messages=5),
    "messages an object": body_with(messages={}),
    "overrides an object": body_with(overrides={}),
    "generation_params a list": body_with(generation_params=[]),
    "group_overrides a string": body_with(group_overrides="x"),
    "group_overrides a number": body_with(group_overrides=1),
    "overrides count": body_with(overrides=[{}]),
    "bad literal in overrides": B + b',"group_overrides":{"a":tru}}',
    "bad number in overrides": B + b',"group_overrides":{"a":1.}}',
    "trailing comma in overrides": B + b',"group_overrides":{"a":1,}}',
    "missing colon in overrides": B + b',"group_overrides":{"a" 1}}',
    "unquoted key in overrides": B + b',"group_overrides":{a:1}}',
    "control char in overrides": B + b',"group_overrides":{"a":"x\x01"}}',
    "unclosed overrides": B + b',"group_overrides":{"a":1}',
    "advantages one of two": body_with(advantages=[[1.0, 2.0]]),
    "distill_logprobs count with empty ids": body_with(distill_token_ids=[], distill_logprobs=[[[1.0]]]),
    "empty object": b"{}",
    "array": b"[]",
    "number": b"1",
    "empty": b"",
    "whitespace": b" \n",
    "trailing garbage": B + b"} x",
    "trailing brace": B + b"}}",
    "two values": B + b"} {}",
    "truncated": B,
    "truncated number": B[:-4],
    "missing colon": b'{"tokens" [[1]],"masks":[[1]],"scores":[1]}',
    "missing comma": b'{"tokens":[[1]] "masks":[[1]],"scores":[1]}',
    "trailing comma": b'{"tokens":[[1]],"masks":[[1]],"scores":[1],}',
    "trailing comma in list": b'{"tokens":[[1,]],"masks":[[1]],"scores":[1]}',
    "bad literal": B + b',"env_id":nul}',
    "bad true": B + b',"x":tru}',
    "leading zero": b'{"tokens":[[01]],"masks":[[1]],"scores":[1]}',
    "leading zero float": with_score(b"01"),
    "bare point": with_score(b"1."),
    "point first": with_score(b".5"),
    "plus sign": with_score(b"+1"),
    "lone minus": with_score(b"-"),
    "empty exponent": with_score(b"1e"),
    "unquoted key": b'{tokens:[[1]],"masks":[[1]],"scores":[1]}',
    "single quotes": b"{'tokens':[[1]],'masks':[[1]],'scores':[1]}",
    "control char": B + b',"x":"a\x01"}',
    "bad utf-8": B + b',"x":"\xff"}',
    "lone surrogate": B + b',"x":"\\ud800"}',
    "unclosed string": B + b',"x":"abc}',
    "nul byte": B + b"\x00}",
    "form feed": B + b"\x0c}",
    "bom": b"\xef\xbb\xbf" + B + b"}",
}

# Bodies the Python path accepts but leaves to it: the fast path declines them.
DECLINED = {
    "NaN": with_score(b"NaN"),
    "Infinity": with_score(b"Infinity"),
    "duplicate key": B + b',"scores":[1.0,2.0]}',
    "duplicate optional key": B + b',"env_id":1,"env_id":null}',
    "-0 token": b'{"tokens":[[-0]],"masks":[[1]],"scores":[1]}',
    "-0 score": b'{"tokens":[[1]],"masks":[[1]],"scores":[-0]}',
    "-0 env_id": B + b',"env_id":-0}',
    "float token": b'{"tokens":[[1.0]],"masks":[[1]],"scores":[1]}',
    "bool token": b'{"tokens":[[true]],"masks":[[1]],"scores":[1]}',
    "string token": b'{"tokens":[["1"]],"masks":[["1"]],"scores":[1]}',
    "string score": b'{"tokens":[[1]],"masks":[[1]],"scores":["1"]}',
    "escaped key": b'{"tok\\u0065ns":[[1]],"masks":[[1]],"scores":[1]}',
    "escape in unknown string": B + b',"x":"a\\nb"}',
    "non-ascii in unknown string": B + ',"x":"é"}'.encode(),
    "messages": body_with(messages=[[{"role": "user", "content": "hi"}], []]),
    "messages of empty chats": body_with(messages=[[], []]),
    "overrides": body_with(overrides=[{}, {}]),
    "images list": body_with(images=[None]),
    "images object": body_with(images={"a": 1}),
    "images string": body_with(images="x"),
    "images number": body_with(images=1),
    "generation_params nested list": body_with(generation_params={"t": [1]}),
    "generation_params nested object": body_with(generation_params={"t": {}}),
    "group_overrides nested": body_with(group_overrides={"a": 1, "b": {"c": 2}}),
    "group_overrides duplicate key": B + b',"group_overrides":{"a":1,"b":2,"a":3}}',
    "generation_params duplicate key": B + b',"generation_params":{"a":1,"a":1}}',
    "group_overrides 65 entries": body_with(group_overrides={f"k{i}": i for i in range(65)}),
    "group_overrides escaped key": B + b',"group_overrides":{"\\u0061":1}}',
    "group_overrides escaped value": B + b',"group_overrides":{"a":"x\\ny"}}',
    "group_overrides non-ascii value": B + ',"group_overrides":{"a":"\u00e9"}}'.encode(),
    "group_overrides non-ascii key": B + ',"group_overrides":{"\u00e9":1}}'.encode(),
    "group_overrides -0": B + b',"group_overrides":{"a":-0}}',
    "group_overrides over int64": body_with(group_overrides={"a": 2**63}),
    "group_overrides under int64": body_with(group_overrides={"a": -(2**63) - 1}),
    "group_overrides huge int": body_with(group_overrides={"a": 10**30}),
    "group_overrides NaN": B + b',"group_overrides":{"a":NaN}}',
    "group_overrides 18 digits": B + b',"group_overrides":{"a":0.123456789012345678}}',
    "group_overrides overflow": B + b',"group_overrides":{"a":1e400}}',
    "group_overrides subnormal": B + b',"group_overrides":{"a":1e-320}}',
    "env_id over int64": body_with(env_id=2**63),
    "policy_version over int63": body_with(policy_versions=[2**63, None]),
    "18 digits": with_score(b"0.123456789012345678"),
    "16-digit integer as float": with_score(b"1234567890123456"),
    "subnormal": with_score(b"1e-320"),
    "overflow": with_score(b"1e400"),
    "deep unknown value": B + b',"x":' + b"[" * 70 + b"]" * 70 + b"}",
}


@pytest.mark.parametrize("name", sorted(INVALID))
def test_bodies_python_rejects_are_declined(fast, name):
    body = INVALID[name]
    with pytest.raises(ScoredDataInvalid):
        parse_scored_data(body)
    assert fast.canonical_group(body, True) is None
    if body.strip():  # "[]" would be a valid empty list
        assert fast.canonical_groups(b"[" + body + b"]", True) is None


@pytest.mark.parametrize("name", sorted(DECLINED))
def test_bodies_left_to_python_are_declined(fast, name):
    body = DECLINED[name]
    parse_scored_data(body)  # valid for the Python path...
    assert fast.canonical_group(body, True) is None  # ...which the fast path leaves it to


def test_basenv_default_shape_is_handled(fast):
    """Atropos' BaseEnv default collect_trajectories: every optional per-sequence list
    [] (none given), group_overrides {} or merged from the items: C takes it, byte for
    byte the Python path's, [] kept as sent."""
    g = {
        "tokens": [[1, 2, 3], [1, 4]],
        "masks": [[-100, 2, 3], [-100, 4]],
        "scores": [1.0, -1.0],
        "advantages": [],
        "ref_logprobs": [],
        "messages": [],
        "overrides": [],
        "group_overrides": {},
        "images": [],
    }
    for overrides in ({}, {"server_type": "openai"}, {"group_size": 8}, {"group_size": 2, "note": "x"}):
        for env_id in (None, 0, 3):
            group = {**g, "group_overrides": overrides, "env_id": env_id}
            for body in (json.dumps(group).encode(), json.dumps(group, separators=(",", ":")).encode()):
                got = check(fast, body, must_handle=True)
                assert got[1:4] == (2, env_id, None)
                assert b'"advantages":[],"ref_logprobs":[],"messages":[]' in got[0]
                assert b'"group_overrides":%s' % json.dumps(overrides, separators=(",", ":")).encode() in got[0]
            lst = json.dumps([group, {**group, "images": {}}]).encode()
            assert len(check(fast, lst, many=True, must_handle=True)) == 2
    # The other per-sequence fields, [] too: none given, kept as [].
    for key in ("inference_logprobs", "distill_token_ids", "distill_logprobs", "policy_versions"):
        got = check(fast, json.dumps({**g, key: []}).encode(), must_handle=True)
        assert b'"%s":[]' % key.encode() in got[0]
        assert got[3] is None  # policy_versions [] means none given (scored_data.incoming)
    # [] beside a given field is not checked against it (distill_* cross-checks).
    check(fast, body_with(distill_token_ids=[], distill_logprobs=[[[0.5]], []]), must_handle=True)
    check(fast, body_with(distill_token_ids=[[[1]], []], distill_logprobs=[]), must_handle=True)
    check(fast, body_with(advantages=[], inference_logprobs=[[-0.5, -0.25], [-1e-05]]), must_handle=True)


def test_flat_free_form_objects_are_handled(fast):
    """generation_params and group_overrides of scalars: strings, literals, ints
    (kept ints), floats (spelt as repr), in input order, compact."""
    params = {
        "s": "openai",
        "empty": "",
        "e": "1e-05",
        "t": True,
        "f": False,
        "n": None,
        "zero": 0,
        "i": -7,
        "big": I64_MAX,
        "small": I64_MIN,
        "a": 1e-05,
        "b": 1e16,
        "c": 0.1,
        "d": -0.0,
        "g": 1e-07,
        "h": 1.0,
        "j": 1e22,
        "k": 0.0001,
        "l": 1e15,
        "m": 2.5e-300,
    }
    expected = json.dumps(params, separators=(",", ":")).encode()
    assert b'"a":1e-05' in expected and b'"b":1e+16' in expected and b'"zero":0,' in expected
    for key in ("generation_params", "group_overrides"):
        for body in (body_with(**{key: params}), json.dumps({**BASE, key: params}, indent=1).encode()):
            got = check(fast, body, must_handle=True)
            assert b'"%s":%s' % (key.encode(), expected) in got[0]
        check(fast, body_with(**{key: {}}), must_handle=True)
        check(fast, body_with(**{key: {f"k{i}": i for i in range(64)}}), must_handle=True)
    # Other spellings of the same values: JSON integers stay ints, floats take repr.
    body = B + b',"generation_params":{ "a" : 1E-5 , "b":1e16,"c":0.10,"d":-0e3,"i":10,"x":5e0 },"images":{ }}'
    got = check(fast, body, must_handle=True)
    assert b'"generation_params":{"a":1e-05,"b":1e+16,"c":0.1,"d":-0.0,"i":10,"x":5.0}' in got[0]
    assert b'"images":{}' in got[0]
    # DEL is plain ASCII: copied as it is (neither orjson nor json escapes it).
    got = check(fast, B + b',"group_overrides":{"a":"~\x7f","\x7f":1}}', must_handle=True)
    assert b'"group_overrides":{"a":"~\x7f","\x7f":1}' in got[0]


def scalar_repr(v) -> str:
    if isinstance(v, float):
        return repr(v)
    return json.dumps(v)  # str (ASCII, nothing to escape), int, True/False/None


def test_flat_objects_are_spelt_as_repr(fast):
    """Whatever encode_group does for a free-form field (orjson, or json where orjson
    spells a float otherwise), a flat object comes out as repr spells its values; and
    so does the fast path."""
    rng = random.Random(11)
    random.seed(96)
    for _ in range(500):
        params = rand_flat_object(rng)
        spelt = "{" + ",".join(f"{json.dumps(k)}:{scalar_repr(v)}" for k, v in params.items()) + "}"
        got = check(fast, body_with(generation_params=params, group_overrides=params), must_handle=True)
        assert b'"generation_params":%s,' % spelt.encode() in got[0]
        assert b'"group_overrides":%s,' % spelt.encode() in got[0]


def test_empty_required_lists_are_declined(fast):
    """masks and scores are required per sequence: the fast path never takes [] for
    them, whatever the Python path says of it."""
    for body in (body_with(masks=[]), body_with(scores=[]), body_with(masks=[], scores=[])):
        assert fast.canonical_group(body, True) is None
        assert fast.canonical_groups(b"[" + body + b"]", False) is None


def test_int32_edges(fast):
    for value in (I32_MAX, I32_MIN, I32_MAX - 8, I32_MIN + 9, 1999999999, -1999999999, 1000000000, 0, -1):
        body = json.dumps({"tokens": [[value, 5]], "masks": [[value, -100]], "scores": [1]}).encode()
        got = check(fast, body, must_handle=True)
        assert fast.canonical_group(body, True)[4] == ((value,) if value != -100 else (),)
        assert got[0].startswith(b'{"tokens":[[%d,5]]' % value)


def test_output_longer_than_input(fast):
    """Floats that grow when re-spelt (1e15 -> 1000000000000000.0) outgrow a buffer
    sized for the input."""
    n = 3000
    lits = ["1e15", "-1e-300", "0", "1E9", "5", "1e+2"]
    logprobs = ",".join(lits[i % len(lits)] for i in range(n))
    body = (
        '{"tokens":[[%s]],"masks":[[%s]],"scores":[1e15],"advantages":[[%s]],'
        '"distill_token_ids":[[[1]]],"distill_logprobs":[[[1E-4]]]}'
        % (",".join(["7"] * n), ",".join(["7"] * n), logprobs)
    ).encode()
    got = check(fast, body, must_handle=True)
    assert len(got[0]) > 1.5 * len(body)
    check(fast, b"[" + b",".join([body] * 3) + b"]", many=True, must_handle=True)
    # Floats in a flat object grow too (4 bytes -> 18, 64 of them), last in the body.
    grow = ",".join('"k%d":%s' % (i, ["1e15", "1E9", "-1e-300", "5e0"][i % 4]) for i in range(64))
    small = b'{"tokens":[[1]],"masks":[[1]],"scores":[1],"generation_params":{%s}}' % grow.encode()
    got = check(fast, small, must_handle=True)
    assert len(got[0]) > len(small) + 400


def test_depth_limit_and_unknown_values(fast):
    ok = B + b',"x":' + b"[" * 60 + b"]" * 60 + b"}"
    assert check(fast, ok) is not None
    nested = B + b',"x":{"a":[1,-2.5e-3,true,false,null,"s",{"b":{}}],"c":[]},"y":""}'
    assert check(fast, nested, must_handle=True) is not None


def test_float_spelling_exception_keeps_the_value(fast):
    """Non-shortest 17-digit floats keep their digits: the value is the same as the
    Python path's, only its spelling differs (documented in the module docstring)."""
    body = b'{"tokens":[[1]],"masks":[[1]],"scores":[0.10000000000000001],"advantages":[[1.0000000000000002]]}'
    got = fast.canonical_group(body, False)
    assert got is not None
    expected = encode_group(parse_scored_data(body))
    assert got[0] != expected  # 0.10000000000000001 vs 0.1
    assert json.loads(got[0]) == json.loads(expected)
    assert b"0.10000000000000001" in got[0]


def mutate(body: bytes, rng: random.Random) -> bytes:
    b = bytearray(body)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(4)
        i = rng.randrange(len(b) + 1)
        if op == 0 and b:
            del b[i:]
        elif op == 1 and i < len(b):
            b[i] = rng.randrange(256) if rng.random() < 0.3 else ord(rng.choice('[]{},"-.e0 1'))
        elif op == 2:
            b[i:i] = rng.choice([b"[", b"]", b"{", b"}", b",", b'"', b"-", b".", b"e", b"0", b"null", b"1e5"])
        elif op == 3 and i < len(b):
            del b[i : i + rng.randint(1, 4)]
    return bytes(b)


def test_fuzz_never_crashes_and_agrees(fast):
    rng = random.Random(2024)
    random.seed(97)
    seeds = [json.dumps(rand_group(rng), separators=(",", ":")).encode() for _ in range(20)]
    seeds += [
        b'{"tokens":[[1,2]],"masks":[[-100,2]],"scores":[0.5],"inference_logprobs":[[-1e-05,-2.5]],'
        b'"policy_versions":[3],"env_id":1,"distill_token_ids":[[[1],[2,3]]],"distill_logprobs":[[[0.1],[1e-7,2]]]}',
        b'{"tokens":[[1,2],[3]],"masks":[[-100,2],[3]],"scores":[1.0,0.0],"advantages":[],"ref_logprobs":[],'
        b'"messages":[],"overrides":[],"group_overrides":{"server_type":"openai","group_size":2},"images":[],'
        b'"generation_params":{"t":0.7,"n":-1,"s":"x-e-y","b":true,"z":null,"e":1e-05},"policy_versions":[]}',
    ]
    accepted = 0
    for i in range(3000):
        body = mutate(rng.choice(seeds), rng)
        if i % 5 == 0:
            accepted += check(fast, b"[" + body + b"," + rng.choice(seeds) + b"]", many=True, exact=False) is not None
        else:
            accepted += check(fast, body, exact=False) is not None
    assert accepted > 0  # some mutations stay valid (e.g. a digit changed)


def test_read_group_takes_the_fast_path_and_falls_back_to_python(fast, monkeypatch):
    """What the ingest routes call: the C result when it has one, the Python path's
    for what C declines (a free-form field here), the same Incoming either way."""
    from dataclasses import astuple

    from services.gateway.trajectory import scored_data

    plain = {"tokens": [[5, 6, 7], [8, 9]], "masks": [[-100, 6, 7], [-100, 9]], "scores": [1.0, 0.0], "env_id": 2}
    with_messages = {**plain, "messages": [[{"role": "user", "content": "hi"}], []]}
    calls = []
    real = fast.canonical_group

    def recording(*args: Any) -> Any:
        calls.append(real(*args))
        return calls[-1]

    monkeypatch.setattr(scored_data._scored_fast, "canonical_group", recording)
    for group in (plain, with_messages):
        body = json.dumps(group).encode()
        got = scored_data.read_group(body, True)
        expected = scored_data.incoming(parse_scored_data(body), True)
        assert [list(x) if isinstance(x, tuple) else x for x in astuple(got)] == [
            list(x) if isinstance(x, list) else x for x in astuple(expected)
        ]
        assert got.completions is not None
        assert [tuple(c) for c in got.completions] == [(6, 7), (9,)]
    assert calls[0] is not None and calls[1] is None  # C took the first, declined the second
    with pytest.raises(ScoredDataInvalid, match="masks"):
        scored_data.read_group(json.dumps({**plain, "masks": [[1]]}).encode(), False)
