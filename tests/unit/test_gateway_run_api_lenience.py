"""Where Atropos' `run-api` (the installed atroposlib's server, in process) accepts a
/scored_data or /scored_data_list body, the gateway accepts it too and `/batch`
returns it byte for byte as run-api does; a trainer fed such a group over gRPC decides
per sequence (services/trainer/batching.py). The gateway is stricter only where the
data would poison training (the departures listed last)."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import httpx
import pytest
from atroposlib.api import server as atropos

from services.gateway.generation.pool import InferencePool
from services.gateway.http.app import create_app
from services.gateway.rpc.convert import group_to_proto
from services.gateway.trajectory import TrajectoryState
from services.trainer.batching import prepare

REGISTRATION = {
    "wandb_group": "g",
    "wandb_project": "p",
    "batch_size": 2,
    "max_token_len": 64,
    "checkpoint_dir": "",
    "save_checkpoint_interval": 1,
    "starting_step": 0,
    "num_steps": 10,
}


def good() -> dict:
    return {"tokens": [[1, 2, 3], [1, 4]], "masks": [[-100, 2, 3], [-100, 4]], "scores": [1.0, 0.0]}


MESSAGE = {"role": "user", "content": "q"}
# Bodies run-api's ScoredData accepts: optional fields whose lengths disagree.
LENIENT: dict[str, dict[str, Any]] = {
    "advantages row short": {"advantages": [[0.5, 0.5], [0.1, 0.2]]},
    "advantages row long": {"advantages": [[0.5, 0.5, 0.5, 0.5], [0.1, 0.2]]},
    "advantages one row for two": {"advantages": [[0.5, 0.5, 0.5]]},
    "advantages three rows for two": {"advantages": [[0.5, 0.5, 0.5], [0.1, 0.2], [0.3]]},
    "ref_logprobs row short": {"ref_logprobs": [[-0.5], [-0.1, -0.2]]},
    "ref_logprobs one row": {"ref_logprobs": [[-0.5, -0.5, -0.5]]},
    "inference_logprobs row long": {"inference_logprobs": [[-0.5, -0.5, -0.5], [-0.1, -0.2, -0.3]]},
    "inference_logprobs one row": {"inference_logprobs": [[-0.5, -0.5, -0.5]]},
    "messages one chat for two": {"messages": [[MESSAGE]]},
    "messages three chats": {"messages": [[MESSAGE], [], [MESSAGE]]},
    "overrides one for two": {"overrides": [{"set_advantage_to_zero": True}]},
    "distill_token_ids one row": {"distill_token_ids": [[[1]]]},
    "distill_logprobs one row": {"distill_logprobs": [[[-0.1]]]},
    "distill positions differ": {
        "distill_token_ids": [[[1]], [[2]]],
        "distill_logprobs": [[[-1.0], [-2.0]], [[-2.0]]],
    },
    "distill inner lengths differ": {
        "distill_token_ids": [[[1, 2]], [[2]]],
        "distill_logprobs": [[[-1.0]], [[-2.0]]],
    },
    "everything at once": {
        "advantages": [[0.5]],
        "ref_logprobs": [[-0.5, -0.5, -0.5], [-0.1]],
        "inference_logprobs": [[-0.5], [-0.1, -0.2, -0.3], [-1.0]],
        "messages": [[MESSAGE]],
        "overrides": [{}, {}, {}],
        "distill_token_ids": [[[1]]],
        "distill_logprobs": [[[-1.0], [-2.0]]],
    },
}


@pytest.fixture
def apps():
    atropos.app.state._state.clear()
    ours = create_app(TrajectoryState(), InferencePool([]), max_body_bytes=1 << 20)
    yield atropos.app, ours
    atropos.app.state._state.clear()


@contextlib.asynccontextmanager
async def clients(apps):
    """run-api's and the gateway's clients, a trainer registered and started on each."""
    ref_app, our_app = apps
    async with (
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=ref_app, raise_app_exceptions=False), base_url="http://ref"
        ) as ref,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=our_app), base_url="http://ours") as ours,
    ):
        for c in (ref, ours):
            await c.post("/register", json=REGISTRATION)
            await c.get("/batch")
        yield ref, ours


@pytest.mark.parametrize("name", sorted(LENIENT))
@pytest.mark.parametrize("path", ["/scored_data", "/scored_data_list"])
async def test_what_run_api_accepts_round_trips_through_batch(apps, name, path):
    body = {**good(), **LENIENT[name]}
    payload = body if path == "/scored_data" else [body]
    async with clients(apps) as (ref, ours):
        a = await ref.post(path, json=payload)
        b = await ours.post(path, json=payload)
        assert a.status_code == b.status_code == 200, b.text
        assert a.json() == b.json()
        a, b = await ref.get("/batch"), await ours.get("/batch")
        assert a.status_code == b.status_code == 200
        assert a.content == b.content
        assert b.json()["batch"][0] == {**json.loads(a.content)["batch"][0]}
        a, b = await ref.get("/latest_example"), await ours.get("/latest_example")
        assert a.json() == b.json()


@pytest.mark.parametrize("name", sorted(LENIENT))
def test_a_trainer_uses_what_it_can_of_such_a_group(name):
    """Over gRPC (StreamBatches) such a group reaches the trainer, which falls back per
    sequence and counts it, never failing the batch."""
    from services.gateway.trajectory.door import DoorLimits
    from services.gateway.trajectory.scored_data import ATROPOS_KEYS, admit_group

    body = {**good(), **LENIENT[name]}
    group = admit_group({key: body.get(key) for key in ATROPOS_KEYS}, DoorLimits())
    batch = prepare([group_to_proto(group)])
    assert len(batch.sequences) == 2 and batch.dropped == {}
    for s in batch.sequences:
        assert s.advantages.isfinite().all()
    # A sequence whose row is missing or of another length falls back, counted.
    expected = {}
    for field in ("advantages", "ref_logprobs", "inference_logprobs"):
        rows = body.get(field)
        if rows is not None:
            misfits = sum(1 for i, t in enumerate(body["tokens"]) if i >= len(rows) or len(rows[i]) != len(t))
            if misfits:
                expected[f"{field}_length"] = misfits
    assert batch.fallbacks == expected


# Where the gateway is stricter than run-api, and why (the README lists these).
DEPARTURES: dict[str, dict[str, Any]] = {
    # masks decide which tokens are trained on: misaligned, no token can be used.
    "masks one row for two": {"masks": [[-100, 2, 3]]},
    "masks row short": {"masks": [[-100, 2], [-100, 4]]},
    # the score is the only learning signal of a sequence.
    "scores one for two": {"scores": [1.0]},
    # nothing to train on.
    "no sequences": {"tokens": [], "masks": [], "scores": []},
    "an empty sequence": {"tokens": [[1, 2, 3], []], "masks": [[-100, 2, 3], []]},
    # an embedding lookup of a negative id fails the trainer's step.
    "a negative token id": {"tokens": [[1, -2, 3], [1, 4]]},
    # a negative env id names an environment from the end of the list.
    "a negative env_id": {"env_id": -1},
}


@pytest.mark.parametrize("name", sorted(DEPARTURES))
async def test_departures_from_run_api_are_refused_naming_the_field(apps, name):
    body = {**good(), **DEPARTURES[name]}
    async with clients(apps) as (ref, ours):
        # run-api takes it (or crashes on it: a negative env_id indexes its env list).
        assert (await ref.post("/scored_data", json=body)).status_code in (200, 500)
        b = await ours.post("/scored_data", json=body)
        assert b.status_code == 422 and b.json()["code"] == "INVALID_ARGUMENT"
        field = next(iter(DEPARTURES[name]))
        assert field in b.json()["error"], b.json()


async def test_non_finite_numbers_break_run_apis_own_batch(apps):
    """run-api takes NaN in, then its /batch cannot encode it (500): refused at the door."""
    body = json.dumps(good()).replace("1.0", "NaN", 1)
    async with clients(apps) as (ref, ours):
        headers = {"content-type": "application/json"}
        assert (await ref.post("/scored_data", content=body, headers=headers)).status_code == 200
        assert (await ref.get("/batch")).status_code == 500
        b = await ours.post("/scored_data", content=body, headers=headers)
        assert b.status_code == 422 and "scores[0] is nan" in b.json()["error"]
