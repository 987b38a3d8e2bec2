"""Scored data validation names the field and index; a rejected submission changes
nothing; gzip bodies and body limits; the gRPC -> HTTP table."""

from __future__ import annotations

import gzip
import json
import random

import grpc
import httpx
import pytest

from services.gateway.generation.pool import InferencePool as InferenceClient
from services.gateway.http.app import create_app
from services.gateway.http.errors import http_status
from services.gateway.trajectory import TrajectoryState
from services.gateway.trajectory.scored_data import (
    ScoredDataInvalid,
    encode_group,
    parse_scored_data,
    parse_scored_data_list,
)


def good(n=2, env_id=None):
    tokens = [[1, 2, 3 + i] for i in range(n)]
    return {"tokens": tokens, "masks": [[-100, 2, 3 + i] for i in range(n)], "scores": [1.0] * n, "env_id": env_id}


def problems(body) -> list[str]:
    with pytest.raises(ScoredDataInvalid) as info:
        if isinstance(body, list):
            parse_scored_data_list(json.dumps(body).encode())
        else:
            parse_scored_data(json.dumps(body).encode())
    return info.value.problems


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"masks": [[-100, 2, 3], [-100, 2, 4, 5, 6]]}, "masks[1] has 5 entries but tokens[1] has 3"),
        ({"masks": [[-100, 2, 3]]}, "masks has 1 entries but tokens has 2 (one per sequence)"),
        ({"scores": [1.0]}, "scores has 1 entries but tokens has 2"),
        ({"tokens": [[1, "x", 3], [1, 2, 4]]}, "tokens[0][1]: Input should be a valid integer"),
        ({"tokens": [[1, 2, 3], [1, 2.5, 4]]}, "tokens[1][1]: Input should be a valid integer"),
        ({"tokens": [[1, 2, 2**40], [1, 2, 4]]}, "tokens[0][2]: Input should be less than or equal to 2147483647"),
        ({"scores": ["high", 1.0]}, "scores[0]: Input should be a valid number"),
        ({"tokens": "1 2 3"}, "tokens: Input should be a valid array"),
        ({"advantages": [[0.1, 0.2, 0.3], [0.1]]}, "advantages[1] has 1 entries but tokens[1] has 3"),
        ({"inference_logprobs": [[0.0] * 4, [0.0] * 3]}, "inference_logprobs[0] has 4 entries but tokens[0] has 3"),
        ({"ref_logprobs": [[0.0] * 3]}, "ref_logprobs has 1 entries but tokens has 2"),
        ({"messages": [[{"role": "user"}], []]}, "messages[0][0] must have 'role' and 'content' fields"),
        ({"overrides": [{}]}, "overrides has 1 entries but tokens has 2"),
        (
            {"distill_token_ids": [[[1, 2]], [[3]]], "distill_logprobs": [[[0.0, 0.0]], [[0.0, 0.0]]]},
            "distill_logprobs[1][0] has 2 entries but distill_token_ids[1][0] has 1",
        ),
        ({"tokens": [], "masks": [], "scores": []}, "tokens: a group needs at least one sequence"),
        ({"env_id": "zero"}, "env_id: Input should be a valid integer"),
    ],
)
def test_problems_name_field_and_index(change, expected):
    found = problems({**good(), **change})
    assert any(expected in p for p in found), found


def test_missing_field_and_bad_json():
    body = good()
    del body["masks"]
    assert problems(body) == ["masks: Field required"]
    with pytest.raises(ScoredDataInvalid, match="Invalid JSON"):
        parse_scored_data(b"{not json")


def test_list_problems_name_the_item():
    bad = good()
    bad["masks"][0] = [1]
    found = problems([good(), bad])
    assert found == ["[1].masks[0] has 1 entries but tokens[0] has 3"]
    found = problems([good(), {**good(), "scores": [None, 1.0]}])
    assert found[0].startswith("[1].scores[0]: ")


def test_atropos_lax_types_are_accepted():
    body = good()
    body["scores"] = [1, 0]
    body["tokens"][0] = [1, 2.0, "3"]
    group = parse_scored_data(json.dumps(body).encode())
    assert group["scores"] == [1.0, 0.0] and isinstance(group["scores"][0], float)
    assert group["tokens"][0] == [1, 2, 3]


@pytest.fixture
async def client():
    app = create_app(TrajectoryState(), InferenceClient([]), max_body_bytes=4096)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        await c.post(
            "/register",
            json={
                "wandb_group": "g",
                "wandb_project": "p",
                "batch_size": 4,
                "max_token_len": 64,
                "checkpoint_dir": "",
                "save_checkpoint_interval": 1,
                "starting_step": 0,
                "num_steps": 1,
            },
        )
        yield c


async def test_rejected_submissions_change_nothing(client):
    assert (await client.post("/scored_data", json=good())).json() == {"status": "received"}
    bad = good()
    bad["masks"][1] = bad["masks"][1][:2]
    r = await client.post("/scored_data", json=bad)
    assert r.status_code == 422
    assert r.json()["error"] == "masks[1] has 2 entries but tokens[1] has 3"
    assert r.json()["code"] == "INVALID_ARGUMENT"
    # One bad item rejects the whole list: nothing of it is queued.
    r = await client.post("/scored_data_list", json=[good(), {**good(), "tokens": [[1, 2, "x"], [1, 2, 3]]}])
    assert r.status_code == 422 and "[1].tokens[0][2]" in r.json()["error"]
    assert (await client.get("/status")).json()["queue_size"] == 1
    assert (await client.post("/scored_data", json=good())).json() == {"status": "received"}
    batch = (await client.get("/batch")).json()["batch"]
    assert [g["tokens"] for g in batch] == [good()["tokens"]] * 2


async def test_gzip_bodies_and_limits(client):
    body = gzip.compress(json.dumps(good()).encode())
    r = await client.post(
        "/scored_data", content=body, headers={"content-encoding": "gzip", "content-type": "application/json"}
    )
    assert r.json() == {"status": "received"}
    r = await client.post("/scored_data", content=b"not gzip", headers={"content-encoding": "gzip"})
    assert r.status_code == 400 and "gzip" in r.json()["error"]
    # Over the limit raw, and over the limit once inflated (a small gzip bomb).
    r = await client.post("/scored_data", content=b"x" * 5000)
    assert r.status_code == 413
    bomb = gzip.compress(b" " * 100_000)
    r = await client.post("/scored_data", content=bomb, headers={"content-encoding": "gzip"})
    assert r.status_code == 413 and "max_body_bytes" in r.json()["error"]
    assert (await client.get("/status")).json()["queue_size"] == 1


async def test_cross_origin_posts_get_the_same_answer_with_cors_headers(client):
    """Ingest has a fast path; a browser's cross-origin post takes the full one, where
    CORS answers it, and the two agree."""
    plain = await client.post("/scored_data", json=good())
    cross = await client.post("/scored_data", json=good(), headers={"origin": "http://ui.example"})
    assert plain.json() == cross.json() == {"status": "received"}
    assert "access-control-allow-origin" not in plain.headers
    assert cross.headers["access-control-allow-origin"] in ("*", "http://ui.example")
    bad = {**good(), "scores": [1.0]}
    plain = await client.post("/scored_data_list", json=[bad])
    cross = await client.post("/scored_data_list", json=[bad], headers={"origin": "http://ui.example"})
    assert plain.status_code == cross.status_code == 422 and plain.json() == cross.json()
    assert (await client.get("/status")).json()["queue_size"] == 2


async def test_fastapi_body_models_answer_422_naming_the_field(client):
    r = await client.post(
        "/register-env", json={"max_token_length": 10, "desired_name": "e", "weight": "heavy", "group_size": 0}
    )
    assert r.status_code == 422
    assert "weight: " in r.json()["error"] and "group_size: " in r.json()["error"]


def test_grpc_codes_map_to_http_in_one_table():
    assert http_status(grpc.StatusCode.INVALID_ARGUMENT) == 400
    assert http_status(grpc.StatusCode.FAILED_PRECONDITION) == 400
    assert http_status(grpc.StatusCode.NOT_FOUND) == 404
    assert http_status(grpc.StatusCode.RESOURCE_EXHAUSTED) == 429
    assert http_status(grpc.StatusCode.UNAVAILABLE) == 503
    assert http_status(grpc.StatusCode.DEADLINE_EXCEEDED) == 504
    assert http_status(grpc.StatusCode.INTERNAL) == 500


def test_stored_groups_encode_exactly_as_atropos_writes_them():
    """Byte for byte what Starlette's json.dumps writes, for floats of every magnitude
    (orjson alone writes 1e-05 as 0.00001) and strings that look like them."""
    rng = random.Random(3)

    def number():
        x = rng.uniform(1, 10) * 10.0 ** rng.randint(-12, 20) * rng.choice([1, -1])
        return rng.choice([x, 0.0, -0.5, 10.00001, float(rng.randint(-3, 3))])

    for _ in range(300):
        n = rng.randint(1, 3)
        body = {
            "tokens": [[1, 2]] * n,
            "masks": [[-100, 2]] * n,
            "scores": [number() for _ in range(n)],
            "inference_logprobs": [[number(), number()] for _ in range(n)],
            "distill_token_ids": [[[1], [2]] for _ in range(n)],
            "distill_logprobs": [[[number()], [number()]] for _ in range(n)],
            "messages": [[{"role": "user", "content": rng.choice(["re-do 0.00001", "1e-7 é", "x"])}] for _ in range(n)],
            "generation_params": {"temperature": number()},
        }
        group = parse_scored_data(json.dumps(body).encode())
        assert encode_group(group) == json.dumps(group, ensure_ascii=False, separators=(",", ":")).encode()


@pytest.mark.parametrize("field", ["masks", "scores"])
def test_empty_required_per_sequence_fields_are_refused(field):
    """An empty optional field means none given; masks and scores are required."""
    body = {"tokens": [[1, 2], [1, 3]], "masks": [[-100, 2], [-100, 3]], "scores": [1.0, 0.0], field: []}
    with pytest.raises(ScoredDataInvalid, match=f"{field} has 0 entries but tokens has 2"):
        parse_scored_data(json.dumps(body).encode())
