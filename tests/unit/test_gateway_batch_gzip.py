"""/batch replies: the next formed batch is compressed ahead of the call that takes
it; every reply decodes to the right batch, with GZipMiddleware's headers."""

from __future__ import annotations

import gzip
from typing import Any, cast

import httpx
import pytest

from services.gateway.atropos_api.batch_gzip import BatchCompressor
from services.gateway.generation.pool import InferencePool as InferenceClient
from services.gateway.http.app import create_app
from services.gateway.trajectory import TrajectoryState


def group(tag: int) -> dict:
    row = [tag * 1000 + i for i in range(200)]
    return {"tokens": [row], "masks": [row], "scores": [float(tag)], "inference_logprobs": [[-0.5] * 200]}


@pytest.fixture
async def client():
    app = create_app(TrajectoryState(), InferenceClient([]), max_body_bytes=1 << 20, response_gzip="always")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        r = await c.post(
            "/register",
            json={
                "wandb_group": "g",
                "wandb_project": "p",
                "batch_size": 2,
                "max_token_len": 64,
                "checkpoint_dir": "",
                "save_checkpoint_interval": 1,
                "starting_step": 0,
                "num_steps": 1,
            },
        )
        assert r.status_code == 200
        yield c


async def test_batches_formed_together_decode_to_the_same_json_gzipped_or_not(client):
    for tag in range(8):
        assert (await client.post("/scored_data", json=group(tag))).json() == {"status": "received"}
    seen = []
    for i in range(4):
        # Alternate: a prepared batch must also be right when the next caller wants no gzip.
        headers = {"accept-encoding": "identity"} if i == 2 else {"accept-encoding": "gzip"}
        r = await client.get("/batch", headers=headers)
        assert r.status_code == 200
        if i == 2:
            assert "content-encoding" not in r.headers
        else:
            assert r.headers["content-encoding"] == "gzip"
            assert r.headers["vary"] == "Origin, Accept-Encoding"
        seen.append([g["scores"][0] for g in r.json()["batch"]])
    # Atropos hands the batches one /batch formed from the last one formed.
    assert seen == [[6.0, 7.0], [4.0, 5.0], [2.0, 3.0], [0.0, 1.0]]
    assert r.json()["batch"][0]["tokens"] == group(0)["tokens"]
    assert (await client.get("/batch")).json() == {"batch": None}


async def test_compressor_hands_prepared_bytes_only_for_the_body_they_were_made_for():
    compressor = BatchCompressor()
    body_first = b'{"batch":[' + b"1," * 2000 + b"1]}"
    body_second = b'{"batch":[' + b"2," * 2000 + b"2]}"
    compressor.prepare(body_first)
    assert compressor.take(body_second) is None
    prepared_future = compressor.take(body_first)
    assert prepared_future is not None
    prepared = await prepared_future
    # Byte for byte what GZipMiddleware writes (zlib's gzip wrapper, level 1).
    assert prepared == compressor.gzip(body_first) and gzip.decompress(prepared) == body_first
    assert compressor.take(body_first) is None  # handed out once
    compressor.prepare(b"{}")  # too small for the middleware to compress
    assert compressor.take(b"{}") is None


@pytest.mark.parametrize(
    ("policy", "client_host", "compressed"),
    [
        ("auto", "127.0.0.1", False),  # loopback: inflating costs the trainer more than the copy
        ("auto", "::1", False),
        ("auto", "10.1.2.3", True),
        ("always", "127.0.0.1", True),
        ("never", "10.1.2.3", False),
    ],
)
async def test_response_gzip_policy_decides_by_the_clients_address(policy, client_host, compressed):
    app = create_app(TrajectoryState(), InferenceClient([]), max_body_bytes=1 << 20, response_gzip=policy)
    transport = httpx.ASGITransport(app=app, client=(client_host, 5000))
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
        await c.post(
            "/register",
            json={
                "wandb_group": "g",
                "wandb_project": "p",
                "batch_size": 1,
                "max_token_len": 64,
                "checkpoint_dir": "",
                "save_checkpoint_interval": 1,
                "starting_step": 0,
                "num_steps": 1,
            },
        )
        for tag in range(3):
            await c.post("/scored_data", json=group(tag))
        for tag in (2, 1):  # the first call forms all three batches; the next is prepared ahead
            r = await c.get("/batch", headers={"accept-encoding": "gzip"})
            assert (r.headers.get("content-encoding") == "gzip") is compressed
            assert r.json()["batch"][0]["scores"] == [float(tag)]


def test_unknown_response_gzip_policy_is_refused():
    with pytest.raises(ValueError, match="response_gzip"):
        BatchCompressor(policy=cast(Any, "sometimes"))
