"""The gateway's store as a real process: acknowledged data survives `kill -9`, and a
full store pushes back (503 + Retry-After, RESOURCE_EXHAUSTED) until drained."""

from __future__ import annotations

import asyncio
import gzip
import json
import signal
from pathlib import Path

import grpc
import httpx
import pytest
from grpc import aio

from clotho.v1 import gateway_service_pb2 as gpb
from clotho.v1 import gateway_service_pb2_grpc as gpb_grpc
from clotho.v1 import scored_data_pb2 as spb
from services import launcher

READY_TIMEOUT = 60
REGISTRATION = {
    "wandb_group": "g",
    "wandb_project": "p",
    "batch_size": 4,
    "max_token_len": 64,
    "checkpoint_dir": "/tmp/ckpt",
    "save_checkpoint_interval": 2,
    "starting_step": 100,
    "num_steps": 10,
}


def scored(size, env_id=None, tag=0):
    tokens = [[tag, 100 + i] for i in range(size)]
    return {"tokens": tokens, "masks": [[-100, 100 + i] for i in range(size)], "scores": [0.5] * size, "env_id": env_id}


def grpc_group(size, tag):
    seqs = [spb.ScoredSequence(tokens=[tag, 100 + i], masks=[-100, 100 + i], score=0.5) for i in range(size)]
    return gpb.SubmitScoredDataRequest(group=spb.ScoredGroup(sequences=seqs))


async def start_gateway(tmp_path: Path, data_dir: Path, *extra: str) -> tuple[launcher.Child, str, str]:
    args = ["--http-port", "0", "--grpc-port", "0", "--grace-seconds", "1", "--data-dir", str(data_dir), *extra]
    child = await launcher.start("gateway", "services.gateway", args, tmp_path)
    ready = await launcher.wait_ready(child, READY_TIMEOUT)
    return child, f"http://127.0.0.1:{ready['http_port']}", f"127.0.0.1:{ready['grpc_port']}"


def tags_of_json(batch) -> list[int]:
    return [g["tokens"][0][0] for g in batch]


def tags_of_proto(response) -> list[int]:
    return [g.sequences[0].tokens[0] for g in response.groups]


async def test_acknowledged_data_survives_kill_9(tmp_path):
    data_dir = tmp_path / "store"
    child, http_url, grpc_url = await start_gateway(tmp_path, data_dir)
    acked: list[int] = []
    handed_out: list[int] = []
    try:
        async with httpx.AsyncClient(base_url=http_url, timeout=30) as http, aio.insecure_channel(grpc_url) as channel:
            stub = gpb_grpc.GatewayServiceStub(channel)
            await http.post("/register", json=REGISTRATION)
            assert (await http.get("/batch")).json() == {"batch": None}  # started
            env = (
                await http.post(
                    "/register-env",
                    json={
                        "max_token_length": 64,
                        "desired_name": "e",
                        "weight": 1.0,
                        "group_size": 2,
                    },
                )
            ).json()
            assert env["env_id"] == 0

            # Concurrent REST posts (they share group commits), a gzip list, gRPC streams.
            async def post(tag):
                r = await http.post("/scored_data", json=scored(2, env_id=0, tag=tag))
                assert r.json() == {"status": "received"}
                acked.append(tag)

            await asyncio.gather(*(post(t) for t in range(24)))
            body = gzip.compress(json.dumps([scored(2, tag=t) for t in range(24, 30)]).encode())
            r = await http.post(
                "/scored_data_list",
                content=body,
                headers={"content-encoding": "gzip", "content-type": "application/json"},
            )
            assert r.json() == {"status": "received", "groups_processed": 6}
            acked += range(24, 30)

            async def stream(tags):
                for t in tags:
                    yield grpc_group(2, t)

            for chunk in (range(30, 36), range(36, 40)):
                reply = await stub.SubmitScoredData(stream(chunk))
                assert reply.received == len(chunk)
                acked += chunk
            # A group of 1 for an env of 2 waits in its env's buffer.
            assert (await http.post("/scored_data", json=scored(1, env_id=0, tag=99))).json() == {
                "status": "buffered",
                "buffer_size": 1,
            }

            # /batch forms all 20 batches at once and keeps 19; StreamBatches takes one of those.
            handed_out += tags_of_json((await http.get("/batch")).json()["batch"])
            call = stub.StreamBatches()
            await call.write(gpb.StreamBatchesRequest(credits=1, policy_version=7))
            handed_out += tags_of_proto(await asyncio.wait_for(call.read(), 30))
            call.cancel()
            assert (await http.get("/status")).json() == {"current_step": 120, "queue_size": 0}

            # More data after the batches were formed, then the process dies.
            await asyncio.gather(*(post(t) for t in range(40, 46)))
    finally:
        child.proc.send_signal(signal.SIGKILL)
        assert await child.proc.wait() == -signal.SIGKILL
        await launcher.stop(child)

    child, http_url, grpc_url = await start_gateway(tmp_path, data_dir)
    try:
        async with httpx.AsyncClient(base_url=http_url, timeout=30) as http, aio.insecure_channel(grpc_url) as channel:
            stub = gpb_grpc.GatewayServiceStub(channel)
            # Registrations, started flag, step and the trainer's version are back.
            assert (await http.get("/info")).json() == {"batch_size": 4, "max_token_len": 64}
            assert (await http.get("/status")).json() == {"current_step": 120, "queue_size": 6}
            assert (await stub.GetStatus(gpb.GetStatusRequest())).policy_version == 7
            env = (
                await http.post(
                    "/register-env",
                    json={
                        "max_token_length": 64,
                        "desired_name": "e",
                        "weight": 1.0,
                        "group_size": 2,
                    },
                )
            ).json()
            assert (env["status"], env["env_id"], env["wandb_name"]) == ("success", 1, "e_1")
            # The buffered group is still waiting for its partner.
            assert (await http.post("/scored_data", json=scored(1, env_id=0, tag=98))).json() == {
                "status": "buffered",
                "buffer_size": 0,
            }
            assert (await http.post("/scored_data", json=scored(2, tag=97))).json() == {"status": "received"}
            acked.append(97)
            # Drain: the 18 batches /batch kept come first, then 4 formed from the queue.
            call = stub.StreamBatches()
            await call.write(gpb.StreamBatchesRequest(credits=100))
            steps = []
            while len(handed_out) < len(acked) + 2:
                response = await asyncio.wait_for(call.read(), 30)
                handed_out += tags_of_proto(response)
                steps.append(response.step)
            call.cancel()
            assert steps == [120] * 18 + [121, 122, 123, 124]
            assert (await http.get("/batch")).json() == {"batch": None}
            assert (await http.get("/status")).json() == {"current_step": 124, "queue_size": 0}
    finally:
        code = await launcher.stop(child, grace=30)
        assert code == 0

    # Every acknowledged group exactly once (plus the buffered pair), nothing twice.
    assert sorted(handed_out) == sorted(acked + [98, 99])


@pytest.mark.parametrize("capacity", [5])
async def test_a_full_store_pushes_back_until_drained(tmp_path, capacity):
    child, http_url, grpc_url = await start_gateway(
        tmp_path, tmp_path / "store", "--max-stored-groups", str(capacity), "--retry-after-seconds", "3"
    )
    try:
        async with httpx.AsyncClient(base_url=http_url, timeout=30) as http, aio.insecure_channel(grpc_url) as channel:
            stub = gpb_grpc.GatewayServiceStub(channel)
            await http.post("/register", json={**REGISTRATION, "batch_size": 2})
            for tag in range(capacity):
                assert (await http.post("/scored_data", json=scored(1, tag=tag))).status_code == 200

            r = await http.post("/scored_data", json=scored(1, tag=50))
            assert r.status_code == 503 and r.headers["retry-after"] == "3"
            assert r.json()["code"] == "RESOURCE_EXHAUSTED" and "full" in r.json()["error"]
            r = await http.post("/scored_data_list", json=[scored(1, tag=51)])
            assert r.status_code == 503
            with pytest.raises(aio.AioRpcError) as info:
                await stub.SubmitScoredData(iter([grpc_group(1, 52)]))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            # A list that could never fit is a client error, not a reason to retry.
            r = await http.post("/scored_data_list", json=[scored(1, tag=t) for t in range(capacity + 1)])
            assert r.status_code == 400

            # Nothing accepted was dropped; the trainer takes two batches (4 groups).
            status = await stub.GetStatus(gpb.GetStatusRequest())
            assert (status.stored_groups, status.max_stored_groups) == (capacity, capacity)
            first = (await http.get("/batch")).json()["batch"]
            second = (await http.get("/batch")).json()["batch"]
            assert sorted(tags_of_json(first + second)) == [0, 1, 2, 3]

            # Room again: accepted.
            for tag in (60, 61, 62):
                assert (await http.post("/scored_data", json=scored(1, tag=tag))).status_code == 200
            reply = await stub.SubmitScoredData(iter([grpc_group(1, 63)]))
            assert reply.received == 1
            metrics = (await http.get("/metrics")).text
            assert "clotho_gateway_refused_full_total 3.0" in metrics
            assert "clotho_gateway_stored_groups 5.0" in metrics
    finally:
        assert await launcher.stop(child, grace=30) == 0
