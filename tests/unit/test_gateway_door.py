"""The door (services/gateway/trajectory/door.py): what no trainer could train on is
refused naming field and index, the same way on /scored_data, /scored_data_list (the
C fast path and the pydantic path) and GatewayService.SubmitScoredData; registrations
that would break the state are refused too, and a refused change leaves memory and the
store as they were."""

from __future__ import annotations

import json

import httpx
import pytest

from clotho.v1 import gateway_service_pb2 as gpb
from clotho.v1 import scored_data_pb2 as spb
from services.common.errors import InvalidArgument
from services.gateway.generation.pool import InferencePool
from services.gateway.http.app import create_app
from services.gateway.rpc.servicer import GatewayServicer
from services.gateway.trajectory import TrajectoryState, _scored_fast
from services.gateway.trajectory.door import DoorLimits
from services.gateway.trajectory.records import EnvRegistration, TrainerRegistration
from services.gateway.trajectory.scored_data import ScoredDataInvalid, read_group, read_group_list

VOCAB = 100
BATCH = 4


def good(n: int = 2) -> dict:
    tokens = [[1, 2, 3 + i] for i in range(n)]
    return {"tokens": tokens, "masks": [[-100, 2, 3 + i] for i in range(n)], "scores": [1.0] * n}


def raw(body: dict, **literals: str) -> bytes:
    """JSON of `body` with some values spelt literally (NaN, Infinity, 1e400)."""
    text = json.dumps(body)
    for key, literal in literals.items():
        text = text.replace(f'"@{key}"', literal)
    return text.encode()


# (name, body bytes, the problem the door names)
CASES = [
    ("NaN score", raw({**good(), "scores": [1.0, "@x"]}, x="NaN"), "scores[1] is nan"),
    ("Infinity score", raw({**good(), "scores": ["@x", 1.0]}, x="-Infinity"), "scores[0] is -inf"),
    ("overflowing score", raw({**good(), "scores": ["@x", 1.0]}, x="1e400"), "scores[0] is inf"),
    (
        "NaN advantage",
        raw({**good(), "advantages": [[0.0, 0.0, 0.0], [0.0, "@x", 0.0]]}, x="NaN"),
        "advantages[1][1] is nan",
    ),
    (
        "Infinity inference logprob",
        raw({**good(), "inference_logprobs": [["@x", 0.0, 0.0], [0.0, 0.0, 0.0]]}, x="-Infinity"),
        "inference_logprobs[0][0] is -inf",
    ),
    (
        "NaN ref logprob",
        raw({**good(), "ref_logprobs": [[0.0, 0.0, 0.0], [0.0, 0.0, "@x"]]}, x="NaN"),
        "ref_logprobs[1][2] is nan",
    ),
    (
        "NaN distill logprob",
        raw({**good(), "distill_token_ids": [[[1]], [[1]]], "distill_logprobs": [[[0.0]], [["@x"]]]}, x="NaN"),
        "distill_logprobs[1][0][0] is nan",
    ),
    (
        "NaN in generation_params",
        raw({**good(), "generation_params": {"t": "@x"}}, x="NaN"),
        "generation_params.t is nan",
    ),
    ("negative token", raw({**good(), "tokens": [[1, 2, 3], [1, -5, 4]]}), "tokens[1][1] is -5"),
    ("token beyond the vocabulary", raw({**good(), "tokens": [[1, 2, VOCAB], [1, 2, 4]]}), "tokens[0][2] is 100"),
    (
        "empty sequence",
        raw({"tokens": [[1, 2], []], "masks": [[1, 2], []], "scores": [1.0, 0.0]}),
        "tokens[1] is empty",
    ),
    ("group larger than a batch", raw(good(BATCH + 1)), "tokens has 5 sequences but the trainer's batch size is 4"),
    ("negative env_id", raw({**good(), "env_id": -1}), "env_id is -1"),
]


def limited_state() -> TrajectoryState:
    state = TrajectoryState(refuse_oversized_groups=True)
    state.vocab_size = VOCAB
    state.register_trainer(TrainerRegistration("g", "p", BATCH, 64, "", 1, 0, 10))
    return state


@pytest.mark.parametrize("name, body, problem", CASES, ids=[c[0] for c in CASES])
def test_each_class_is_refused_naming_field_and_index_by_both_parsers(name, body, problem):
    limits = limited_state().limits
    with pytest.raises(ScoredDataInvalid) as one:
        read_group(body, False, limits)
    assert any(problem in p for p in one.value.problems), one.value.problems
    with pytest.raises(ScoredDataInvalid) as many:
        read_group_list(b"[" + raw(good()) + b"," + body + b"]", True, limits)
    assert any(p.startswith("[1].") and problem in p for p in many.value.problems), many.value.problems


# The group's size against the batch is checked on what C returns (read_group).
IN_C = [c for c in CASES if c[0] != "group larger than a batch"]


@pytest.mark.parametrize("name, body, problem", IN_C, ids=[c[0] for c in IN_C])
def test_the_c_fast_path_never_takes_what_the_door_refuses(name, body, problem):
    limit = DoorLimits(VOCAB).token_limit
    assert _scored_fast.canonical_group(body, True, limit) is None
    assert _scored_fast.canonical_groups(b"[" + body + b"]", False, limit) is None


def test_the_c_fast_path_takes_what_the_door_admits():
    body = raw({**good(), "env_id": 0, "tokens": [[0, 2, VOCAB - 1], [1, 2, 4]]})
    got = _scored_fast.canonical_group(body, True, VOCAB)
    assert got is not None and got[1] == 2
    assert _scored_fast.canonical_group(body, True, VOCAB - 1) is None
    assert _scored_fast.canonical_group(body, True) is not None  # no limit: Atropos' domain only
    with pytest.raises(ValueError):
        _scored_fast.canonical_group(body, True, 0)


@pytest.fixture
async def http_and_rpc():
    state = limited_state()
    state.mark_started()
    state.register_env(EnvRegistration(100, "e", 1.0, 2))
    app = create_app(state, InferencePool([]), max_body_bytes=1 << 20)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        yield state, client, GatewayServicer(state)


def to_proto(body: dict) -> spb.ScoredGroup:
    from services.gateway.rpc.convert import group_to_proto
    from services.gateway.trajectory.scored_data import ATROPOS_KEYS

    return group_to_proto({key: body.get(key) for key in ATROPOS_KEYS})


async def submit(servicer, groups):
    async def requests():
        for g in groups:
            yield gpb.SubmitScoredDataRequest(group=g)

    return await servicer.SubmitScoredData(requests(), None)


@pytest.mark.parametrize("name, body, problem", CASES, ids=[c[0] for c in CASES])
async def test_rest_and_grpc_refuse_alike_and_change_nothing(http_and_rpc, name, body, problem):
    state, client, servicer = http_and_rpc
    before = state.queue_size
    for path, payload in (("/scored_data", body), ("/scored_data_list", b"[" + body + b"]")):
        r = await client.post(path, content=payload, headers={"content-type": "application/json"})
        assert r.status_code == 422, (path, r.text)
        assert problem in r.json()["error"] and r.json()["code"] == "INVALID_ARGUMENT"
    if name == "NaN in generation_params":
        return  # Struct numbers: the gRPC side below covers the float fields
    group = json.loads(body.replace(b"1e400", b"Infinity"))
    with pytest.raises(InvalidArgument) as info:
        await submit(servicer, [to_proto(good()), to_proto(group)])
    assert "groups[1]." in str(info.value) and problem.split(" is ")[0] in str(info.value)
    assert state.queue_size == before


async def test_registrations_that_would_break_the_state_are_refused(http_and_rpc):
    state, client, servicer = http_and_rpc
    env = {"max_token_length": 10, "desired_name": "x", "group_size": 2}
    for weight_literal in ("NaN", "Infinity", "-1.0"):
        r = await client.post(
            "/register-env",
            content=f'{{"max_token_length":10,"desired_name":"x","group_size":2,"weight":{weight_literal}}}',
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 422 and "weight" in r.text, r.text
    r = await client.post("/register-env", json={**env, "weight": 1.0, "group_size": BATCH + 1})
    assert r.status_code == 400 and "group_size is 5" in r.json()["error"]
    assert (await client.request("GET", "/status-env", json={"env_id": -1})).status_code == 422
    assert (await client.post("/disconnect-env", json={"env_id": -1})).status_code == 422
    reg = {"wandb_group": "g", "wandb_project": "p", "max_token_len": 1, "checkpoint_dir": "", "starting_step": 0}
    for size in (0, -3):
        r = await client.post(
            "/register", json={**reg, "batch_size": size, "save_checkpoint_interval": 1, "num_steps": 1}
        )
        assert r.status_code == 422 and "batch_size" in r.text
    for weight in (float("nan"), float("inf"), -0.5):
        with pytest.raises(InvalidArgument, match="weight"):
            await servicer.RegisterEnv(gpb.RegisterEnvRequest(desired_name="x", weight=weight, group_size=1), None)
    for call, request in (
        (servicer.GetEnvStatus, gpb.GetEnvStatusRequest(env_id=-1)),
        (servicer.DisconnectEnv, gpb.DisconnectEnvRequest(env_id=-1)),
    ):
        with pytest.raises(InvalidArgument, match="env_id is -1"):
            await call(request, None)
    assert len(state.envs) == 1
    # The one env registered still answers /status-env (no stored NaN weight).
    assert (await client.request("GET", "/status-env", json={"env_id": 0})).status_code == 200


def test_a_record_the_journal_cannot_take_changes_nothing_in_memory(monkeypatch):
    state = limited_state()
    state.mark_started()

    def refuse(record):
        raise TypeError("cannot journal")

    monkeypatch.setattr(state.journal, "env", refuse)
    with pytest.raises(TypeError):
        state.register_env(EnvRegistration(10, "e", 1.0, 2))
    assert state.envs == []
    fresh = TrajectoryState()
    monkeypatch.setattr(fresh.journal, "trainer", lambda registration: refuse(registration))
    with pytest.raises(TypeError):
        fresh.register_trainer(TrainerRegistration("g", "p", 4, 64, "", 1, 0, 10))
    assert fresh.trainer is None


def test_a_bare_state_keeps_run_apis_oversized_groups():
    """TrajectoryState() behaves as run-api (the parity tests); the gateway process
    refuses oversized groups by default (GatewaySettings.refuse_oversized_groups)."""
    from services.gateway.settings import GatewaySettings

    state = TrajectoryState()
    state.register_trainer(TrainerRegistration("g", "p", BATCH, 64, "", 1, 0, 10))
    assert read_group(raw(good(BATCH + 1)), False, state.limits).size == BATCH + 1
    assert GatewaySettings().refuse_oversized_groups
