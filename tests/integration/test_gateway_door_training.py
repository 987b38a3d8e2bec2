"""Every class of unusable input fed to a real gateway process and a real trainer
process: what no trainer could train on is refused at the gateway naming field and
index; what the gateway lets through but a trainer cannot use (token ids beyond the
model's vocabulary while the gateway does not know it, advantages of another length
as run-api takes them, numbers beyond float32) is dropped or falls back per sequence,
counted in the step line; the trainer keeps training and every acknowledged usable
sequence is trained on."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from test_trainer_loop import RUN_SECONDS, killed_on_exit, read_json_line, start_trainer

from trainer_fakes import FakeShard, load_model, start_shard

BATCH = 4


def group(k: int, **fields: Any) -> dict[str, Any]:
    """Two sequences with tokens from the tiny vocabulary (7..39), unique per k."""
    tokens = [[7, 8, 9, 10 + k % 20, 11], [7, 8, 9, 12, 10 + k % 20, 13]]
    body: dict[str, Any] = {
        "tokens": tokens,
        "masks": [[-100, -100, 9, 10 + k % 20, 11], [-100, -100, 9, 12, 10 + k % 20, 13]],
    }
    body["scores"] = [1.0, 0.0]
    return {**body, **fields}


def raw(body: dict, literal: str) -> bytes:
    return json.dumps(body).replace('"@"', literal).encode()


REFUSED = [
    (raw(group(0, scores=[1.0, "@"]), "NaN"), "scores[1] is nan"),
    (raw(group(0, advantages=[[0.0] * 5, [0.0, 0.0, "@", 0.0, 0.0, 0.0]]), "Infinity"), "advantages[1][2] is inf"),
    (raw(group(0, inference_logprobs=[["@"] * 5, [0.0] * 6]), "-Infinity"), "inference_logprobs[0][0] is -inf"),
    (raw(group(0, tokens=[[7, 8, -1, 10, 11], [7, 8, 9, 12, 10, 13]]), ""), "tokens[0][2] is -1"),
    (raw({"tokens": [[7, 8], []], "masks": [[-100, 8], []], "scores": [1.0, 0.0]}, ""), "tokens[1] is empty"),
    (raw({**group(0), "tokens": [[7, 8]] * 5, "masks": [[-100, 8]] * 5, "scores": [0.0] * 5}, ""), "batch size is 4"),
    (raw(group(0, env_id=-2), ""), "env_id is -2"),
    (raw(group(0, generation_params={"temperature": "@"}), "NaN"), "generation_params.temperature is nan"),
]


@pytest.fixture
async def shard(tiny_model_dir):
    fake = FakeShard(dict(load_model(tiny_model_dir).named_parameters()))
    server, target = await start_shard(fake)
    yield fake, target
    await server.stop(0)


async def test_unusable_input_is_refused_or_dropped_and_training_goes_on(
    tiny_model_dir, shard, tmp_path, service_process
):
    fake, shard_target = shard
    args = ["--http-port", "0", "--grpc-port", "0", "--grace-seconds", "1", "--data-dir", str(tmp_path / "store")]
    async with service_process("services.gateway", args, tmp_path) as (_, ready):
        url = f"http://127.0.0.1:{ready['http_port']}"
        gateway_target = f"127.0.0.1:{ready['grpc_port']}"
        proc = await start_trainer(tiny_model_dir, gateway_target, [shard_target], tmp_path, "--num-steps", "3")
        async with killed_on_exit(proc), httpx.AsyncClient(base_url=url, timeout=60) as http:
            assert (await read_json_line(proc))["event"] == "ready"
            for _ in range(600):  # the trainer registers with the gateway
                if (await http.get("/info")).json()["batch_size"] == BATCH:
                    break
                await asyncio.sleep(0.1)
            headers = {"content-type": "application/json"}
            for body, problem in REFUSED:
                for path, payload in (("/scored_data", body), ("/scored_data_list", b"[" + body + b"]")):
                    r = await http.post(path, content=payload, headers=headers)
                    assert r.status_code == 422 and problem in r.json()["error"], (path, r.text)
            r = await http.post(
                "/register-env",
                content=b'{"max_token_length":64,"desired_name":"e","weight":NaN,"group_size":2}',
                headers=headers,
            )
            assert r.status_code == 422 and "weight" in r.text
            assert (await http.request("GET", "/status-env", json={"env_id": -1})).status_code == 422

            # Let through (run-api takes them), unusable in part: the trainer decides.
            through = [
                group(1),
                group(2, tokens=[[7, 8, 9, 10_000, 11], [7, 8, 9, 12, 12, 13]]),  # beyond the vocabulary
                group(3, advantages=[[0.5, 0.5], [0.1] * 6]),  # one row of another length
                group(4, advantages=[[1e39] * 5, [0.1] * 6]),  # inf once float32
                group(5),
                group(6, scores=[0.5, 0.25]),
            ]
            for accepted in through:
                r = await http.post("/scored_data", json=accepted)
                assert r.json() == {"status": "received"}, r.text

            steps = [await read_json_line(proc) for _ in range(3)]
            assert [s["step"] for s in steps] == [1, 2, 3]
            assert await asyncio.wait_for(proc.wait(), RUN_SECONDS) == 0
    total = lambda key: sum(s.get(key, 0) for s in steps)  # noqa: E731
    assert total("dropped/token_out_of_vocab") == 1
    assert total("unusable_dropped") == 1
    assert total("fallback/advantages_length") == 1
    assert total("fallback/advantages_non_finite") == 1
    # Every acknowledged usable sequence was trained on: 12 sent, 1 dropped.
    assert total("sequences") == 2 * len(through) - 1
    assert all(s["sync_ok"] for s in steps) and fake.version == 3
