"""The gateway as a real process on loopback: the Atropos REST flow, StreamBatches
credits, bad input, and /generate without inference."""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from grpc import aio

from clotho.v1 import gateway_service_pb2 as gpb
from clotho.v1 import gateway_service_pb2_grpc as gpb_grpc
from clotho.v1 import scored_data_pb2 as spb

REPO = Path(__file__).resolve().parents[2]
READY_TIMEOUT = 60


@dataclass
class Gateway:
    proc: asyncio.subprocess.Process
    http: str
    grpc: str


@pytest.fixture
async def gateway(tmp_path, service_process):
    args = ["--http-port", "0", "--grpc-port", "0", "--grace-seconds", "1"]
    # service_process also checks that SIGTERM is a clean shutdown (exit code 0).
    async with service_process("services.gateway", args, tmp_path, ready_timeout=READY_TIMEOUT) as (child, ready):
        yield Gateway(child.proc, f"http://127.0.0.1:{ready['http_port']}", f"127.0.0.1:{ready['grpc_port']}")


REGISTRATION = {
    "wandb_group": "g",
    "wandb_project": "p",
    "batch_size": 4,
    "max_token_len": 64,
    "checkpoint_dir": "/tmp/ckpt",
    "save_checkpoint_interval": 2,
    "starting_step": 0,
    "num_steps": 10,
}


def scored(size, env_id=None, tag=0):
    tokens = [[tag, 100 + i, 200 + i] for i in range(size)]
    return {
        "tokens": tokens,
        "masks": [[-100, 100 + i, 200 + i] for i in range(size)],
        "scores": [0.5] * size,
        "env_id": env_id,
    }


async def test_rest_flow(gateway):
    async with httpx.AsyncClient(base_url=gateway.http, timeout=30) as http:
        r = await http.post("/register", json=REGISTRATION)
        assert isinstance(r.json()["uuid"], int)
        assert (
            await http.post(
                "/register-env", json={"max_token_length": 64, "desired_name": "e", "weight": 1.0, "group_size": 2}
            )
        ).json() == {"status": "wait for trainer to start"}
        assert (await http.get("/batch")).json() == {"batch": None}
        env = (
            await http.post(
                "/register-env", json={"max_token_length": 64, "desired_name": "e", "weight": 1.0, "group_size": 2}
            )
        ).json()
        assert env["status"] == "success" and env["env_id"] == 0 and env["wandb_name"] == "e_0"

        assert (await http.post("/scored_data", json=scored(2, env_id=0, tag=1))).json() == {"status": "received"}
        # A group of 1 for an env of 2 waits in the buffer for a second one.
        assert (await http.post("/scored_data", json=scored(1, env_id=0, tag=2))).json() == {
            "status": "buffered",
            "buffer_size": 1,
        }
        body = gzip.compress(json.dumps([scored(1, env_id=0, tag=3)]).encode())
        r = await http.post(
            "/scored_data_list", content=body, headers={"content-encoding": "gzip", "content-type": "application/json"}
        )
        assert r.json() == {"status": "received", "groups_processed": 1, "buffered": 1, "last_buffer_size": 0}
        status_env = (await http.request("GET", "/status-env", json={"env_id": 0})).json()
        assert status_env == {
            "current_step": 0,
            "queue_size": 2,
            "unallocated_fraction": 1.0,
            "self_queue_size": 2,
            "max_group_size": 2,
            "env_weight": 1.0,
        }

        batch = (await http.get("/batch")).json()["batch"]
        assert [g["tokens"][0][0] for g in batch] == [1, 2, 3]
        assert sum(len(g["tokens"]) for g in batch) == 4
        assert batch[0] == {
            **scored(2, env_id=0, tag=1),
            **dict.fromkeys(
                (
                    "advantages",
                    "ref_logprobs",
                    "messages",
                    "generation_params",
                    "inference_logprobs",
                    "overrides",
                    "group_overrides",
                    "images",
                    "distill_token_ids",
                    "distill_logprobs",
                )
            ),
        }
        assert (await http.get("/status")).json() == {"current_step": 1, "queue_size": 0}
        assert (await http.get("/latest_example")).json()["tokens"][0][0] == 3
        assert (await http.get("/info")).json() == {"batch_size": 4, "max_token_len": 64}


async def until(probe, condition, timeout: float = 30.0):
    """Call `probe()` until `condition(result)` holds; fail after `timeout` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition(result := await probe()):
        assert asyncio.get_running_loop().time() < deadline, f"condition not met: {result}"
        await asyncio.sleep(0.02)
    return result


async def read_batch(call) -> gpb.StreamBatchesResponse:
    message = await asyncio.wait_for(call.read(), 30)
    assert message is not aio.EOF
    return message


async def test_stream_batches_never_sends_more_than_the_credits(gateway):
    async with (
        aio.insecure_channel(gateway.grpc) as channel,
        httpx.AsyncClient(base_url=gateway.http, timeout=30) as http,
    ):
        stub = gpb_grpc.GatewayServiceStub(channel)
        await stub.RegisterTrainer(gpb.RegisterTrainerRequest(batch_size=2, starting_step=10, num_steps=100))
        call = stub.StreamBatches()
        await call.write(gpb.StreamBatchesRequest(credits=1, policy_version=4))
        # The credit stream and the HTTP post below are separate connections: wait
        # until the gateway has read the version before sending data.
        await until(lambda: stub.GetStatus(gpb.GetStatusRequest()), lambda s: s.policy_version == 4)

        # Enough for three batches of 2, in one submission.
        await http.post("/scored_data_list", json=[scored(1, tag=t) for t in range(6)])

        first = await read_batch(call)
        assert sum(len(g.sequences) for g in first.groups) == 2
        # One batch per credit, one step per batch: /status reports the same step.
        assert first.step == 11
        assert (await http.get("/status")).json() == {"current_step": 11, "queue_size": 4}
        # The credit told the gateway the trainer's version; the data (sent after it,
        # with no version and no receipt) is attributed to it.
        assert [s.policy_version for g in first.groups for s in g.sequences] == [4, 4]

        # One more batch's worth arrives (over gRPC) while no credit is left.
        async def groups():
            for tag in (6, 7):
                seq = spb.ScoredSequence(tokens=[tag, 7], masks=[-100, 7], score=1.0)
                yield gpb.SubmitScoredDataRequest(group=spb.ScoredGroup(sequences=[seq]))

        submitted = await stub.SubmitScoredData(groups())
        assert (submitted.received, submitted.buffered) == (2, 0)
        await call.write(gpb.StreamBatchesRequest(credits=2))
        second, third = await read_batch(call), await read_batch(call)
        assert (second.step, third.step) == (12, 13)
        seen = sorted(g.sequences[0].tokens[0] for b in (first, second, third) for g in b.groups)
        assert seen == [0, 1, 2, 3, 4, 5]
        # No credit left: closing our side ends the stream without the fourth batch.
        await call.done_writing()
        assert await asyncio.wait_for(call.read(), 30) is aio.EOF
        assert await call.code() == grpc.StatusCode.OK

        status = await stub.GetStatus(gpb.GetStatusRequest())
        assert (status.current_step, status.queue_size, status.policy_version) == (13, 2, 4)
        assert (status.stored_groups, status.max_stored_groups) == (2, 100_000)
        # The fourth batch is still there for the next taker.
        batch = (await http.get("/batch")).json()["batch"]
        assert sorted(g["tokens"][0][0] for g in batch) == [6, 7]
        assert batch[0]["masks"] == [[-100, 7]] and batch[0]["advantages"] is None
        assert (await http.get("/status")).json()["current_step"] == 14


async def test_stream_batches_first_hands_out_what_batch_formed(gateway):
    """/batch forms every batch at once (Atropos); StreamBatches hands the ones /batch
    kept back before forming new ones, without counting their steps twice."""
    async with (
        aio.insecure_channel(gateway.grpc) as channel,
        httpx.AsyncClient(base_url=gateway.http, timeout=30) as http,
    ):
        await http.post("/register", json={**REGISTRATION, "batch_size": 2})
        await http.post("/scored_data_list", json=[scored(1, tag=t) for t in range(6)])
        batch = (await http.get("/batch")).json()["batch"]
        assert [g["tokens"][0][0] for g in batch] == [4, 5]
        assert (await http.get("/status")).json() == {"current_step": 3, "queue_size": 0}
        await http.post("/scored_data_list", json=[scored(1, tag=t) for t in range(6, 8)])

        stub = gpb_grpc.GatewayServiceStub(channel)
        call = stub.StreamBatches()
        await call.write(gpb.StreamBatchesRequest(credits=3))
        got = [await read_batch(call) for _ in range(3)]
        assert [[g.sequences[0].tokens[0] for g in b.groups] for b in got] == [[2, 3], [0, 1], [6, 7]]
        assert [b.step for b in got] == [3, 3, 4]
        await call.done_writing()
        assert await asyncio.wait_for(call.read(), 30) is aio.EOF


async def test_stream_batches_before_registration_fails_cleanly(gateway):
    async with aio.insecure_channel(gateway.grpc) as channel:
        stub = gpb_grpc.GatewayServiceStub(channel)
        call = stub.StreamBatches()
        await call.write(gpb.StreamBatchesRequest(credits=1))
        with pytest.raises(aio.AioRpcError) as info:
            await asyncio.wait_for(call.read(), 30)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "not registered" in (info.value.details() or "")


async def test_bad_input_is_rejected_and_earlier_data_still_batched(gateway):
    async with (
        aio.insecure_channel(gateway.grpc) as channel,
        httpx.AsyncClient(base_url=gateway.http, timeout=30) as http,
    ):
        await http.post("/register", json={**REGISTRATION, "batch_size": 4})
        assert (await http.post("/scored_data", json=scored(2, tag=1))).json() == {"status": "received"}

        bad = scored(2, tag=2)
        bad["masks"][1] = bad["masks"][1] + [5, 6]
        r = await http.post("/scored_data", json=bad)
        assert r.status_code == 422
        assert r.json()["error"] == "masks[1] has 5 entries but tokens[1] has 3"

        r = await http.post("/scored_data", json={**scored(2, tag=3), "scores": ["good", 1.0]})
        assert r.status_code == 422 and r.json()["error"].startswith("scores[0]: ")
        r = await http.post("/scored_data", content=b'{"tokens": [[1, 2]', headers={"content-type": "application/json"})
        assert r.status_code == 422 and "Invalid JSON" in r.json()["error"]

        stub = gpb_grpc.GatewayServiceStub(channel)

        async def one_good_one_bad():
            yield gpb.SubmitScoredDataRequest(
                group=spb.ScoredGroup(sequences=[spb.ScoredSequence(tokens=[9], masks=[9])])
            )
            yield gpb.SubmitScoredDataRequest(
                group=spb.ScoredGroup(sequences=[spb.ScoredSequence(tokens=[9, 9], masks=[9])])
            )

        with pytest.raises(aio.AioRpcError) as info:
            await stub.SubmitScoredData(one_good_one_bad())
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details() == "groups[1].masks[0] has 1 entries but tokens[0] has 2"

        assert (await http.get("/status")).json()["queue_size"] == 1
        assert (await http.post("/scored_data", json=scored(2, tag=4))).json() == {"status": "received"}
        batch = (await http.get("/batch")).json()["batch"]
        assert [g["tokens"][0][0] for g in batch] == [1, 4]


async def test_generate_without_inference_is_503_json(gateway):
    async with httpx.AsyncClient(base_url=gateway.http, timeout=30) as http:
        r = await http.post("/generate", json={"text": "hi"})
        assert r.status_code == 503
        assert r.json()["code"] == "UNAVAILABLE" and "--inference" in r.json()["error"]
        assert (await http.get("/health")).status_code == 503
        assert (await http.get("/get_model_info")).status_code == 503
        # The trajectory API works regardless.
        assert (await http.get("/status")).json() == {"current_step": 0, "queue_size": 0}


async def test_create_server_in_process_serves_both_protocols_on_one_state():
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from services.gateway.server import create_server
    from services.gateway.settings import GatewaySettings

    server, port = create_server(GatewaySettings(http_port=0, grpc_port=0))
    assert port == server.port and server.http_port > 0
    await server.start()
    try:
        async with (
            aio.insecure_channel(f"127.0.0.1:{port}") as channel,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.http_port}", timeout=30) as http,
        ):
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(service="clotho.v1.GatewayService"))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            stub = gpb_grpc.GatewayServiceStub(channel)
            await stub.RegisterTrainer(gpb.RegisterTrainerRequest(batch_size=1, starting_step=4))
            assert (await http.get("/info")).json() == {"batch_size": 1, "max_token_len": 0}
            await http.post("/scored_data", json=scored(1))
            status = await stub.GetStatus(gpb.GetStatusRequest())
            assert (status.current_step, status.queue_size) == (4, 1)
    finally:
        await server.stop(0)


async def test_runs_alone_where_run_api_would(tmp_path, service_process):
    """`clotho gateway --host H --port P`: the trajectory API listens on H:P, as
    `run-api --host H --port P` does, with no trainer or inference behind it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["--host", "127.0.0.1", "--port", str(port), "--grpc-port", "0", "--grace-seconds", "1"]
    async with service_process("services.gateway", args, tmp_path, ready_timeout=READY_TIMEOUT) as (_child, ready):
        assert ready["http_port"] == port
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            assert (await http.get("/")).json() == {"message": "AtroposLib API"}
            assert (await http.get("/status")).json() == {"current_step": 0, "queue_size": 0}
