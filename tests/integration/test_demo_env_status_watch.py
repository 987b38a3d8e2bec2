"""The demo environment learns of the trainer's progress from a real gateway without
polling: `/status-env?wait=` (a Clotho extension) is a long poll the gateway answers
the moment a batch is handed out; it times out, answers at once when the gateway
stops, reports how long the trainer has waited for data; the plain route keeps
Atropos' JSON; against Atropos' own server (atroposlib) the environment falls back
to polling."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
from grpc import aio

from clotho.v1 import gateway_service_pb2 as gpb
from clotho.v1 import gateway_service_pb2_grpc as gpb_grpc
from services.demo.env import DemoEnv, DemoEnvConfig, Room
from services.gateway.settings import GatewaySettings

TIMEOUT = 10
ATROPOS_KEYS = {"current_step", "queue_size", "unallocated_fraction", "self_queue_size", "max_group_size", "env_weight"}
TRAINER = {
    "wandb_group": "g",
    "wandb_project": "p",
    "batch_size": 4,
    "max_token_len": 64,
    "checkpoint_dir": "/tmp/ckpt",
    "save_checkpoint_interval": 0,
    "starting_step": 0,
    "num_steps": 100,
}


@contextlib.asynccontextmanager
async def gateway() -> AsyncIterator[tuple[Any, str, str]]:
    """(server, gRPC target, HTTP URL) of a real gateway, in process, memory store."""
    from services.gateway.server import create_server

    server, _ = create_server(GatewaySettings(http_port=0, grpc_port=0, store="memory"))
    await server.start()
    try:
        yield server, f"127.0.0.1:{server.port}", f"http://127.0.0.1:{server.http_port}"
    finally:
        await server.stop(0.5)


class Credits:
    """A trainer's StreamBatches stream, a credit at a time."""

    def __init__(self, stub: gpb_grpc.GatewayServiceStub) -> None:
        self.queue: asyncio.Queue[gpb.StreamBatchesRequest | None] = asyncio.Queue()
        self.call = stub.StreamBatches(self._requests())

    async def _requests(self) -> AsyncIterator[gpb.StreamBatchesRequest]:
        while (request := await self.queue.get()) is not None:
            yield request

    def give(self, n: int = 1) -> None:
        self.queue.put_nowait(gpb.StreamBatchesRequest(credits=n))

    async def batch(self) -> gpb.StreamBatchesResponse:
        return await asyncio.wait_for(self.call.read(), TIMEOUT)


def group(tag: int) -> dict:
    return {"tokens": [[tag, 1], [tag, 2]], "masks": [[-100, 1], [-100, 2]], "scores": [0.0, 1.0], "env_id": 0}


async def started_env(http: httpx.AsyncClient, credits: Credits | None = None) -> int:
    """Register the trainer, mark it started (a first credit, or a /batch), register
    one env of groups of 2 (a trainer batch is 2 groups)."""
    assert (await http.post("/register", json=TRAINER)).status_code == 200
    if credits is not None:
        credits.give(0)
        credits.give(1)  # outstanding: no batch can be formed yet
    else:
        await http.get("/batch")
    body = {"max_token_length": 64, "desired_name": "e", "weight": 1.0, "group_size": 2}
    for _ in range(100):
        answer = (await http.post("/register-env", json=body)).json()
        if answer.get("status") == "success":
            return int(answer["env_id"])
        await asyncio.sleep(0.02)
    raise AssertionError("the env never registered")


def demo_env(url: str, tokenizer_dir: str, env_id: int) -> DemoEnv:
    env = DemoEnv(DemoEnvConfig(gateway_url=url, tokenizer_path=tokenizer_dir, group_size=2))
    env.env_id = env_id
    return env


async def fill(room: Room, http: httpx.AsyncClient, groups: int, tag: int = 0) -> None:
    for i in range(groups):
        await asyncio.wait_for(room.acquire(), TIMEOUT)
        assert (await http.post("/scored_data", json=group(tag + i))).status_code == 200
        room.posted()


async def test_the_env_learns_of_a_hand_out_with_no_request_in_between(tokenizer_dir) -> None:
    async with (
        gateway() as (_server, target, url),
        httpx.AsyncClient(base_url=url) as http,
        aio.insecure_channel(target) as channel,
    ):
        credits = Credits(gpb_grpc.GatewayServiceStub(channel))
        env = demo_env(url, tokenizer_dir, await started_env(http, credits))
        room = env.room(http, 2)
        poller = asyncio.ensure_future(room.poll())
        try:
            await fill(room, http, 2)  # one batch: the outstanding credit takes it
            assert len((await credits.batch()).groups) == 2
            await fill(room, http, 2, tag=10)  # the next batch, queued: the room is full
            third = asyncio.ensure_future(room.acquire())
            await asyncio.sleep(0.5)
            assert not third.done()
            asked = room.requests
            assert asked <= 3, asked  # one long poll waits; nothing polls
            credits.give()  # the trainer takes the queued batch
            assert len((await credits.batch()).groups) == 2
            await asyncio.wait_for(third, TIMEOUT)
            # The waiting long poll's answer freed the room (not its timeout: no second ask).
            assert room.requests == asked
            assert room.watch is not None and room.queued == 0
        finally:
            poller.cancel()
            credits.queue.put_nowait(None)


async def test_the_long_poll_times_out_and_the_plain_route_keeps_atropos_json() -> None:
    async with (
        gateway() as (_server, target, url),
        httpx.AsyncClient(base_url=url) as http,
        aio.insecure_channel(target) as channel,
    ):
        credits = Credits(gpb_grpc.GatewayServiceStub(channel))
        env_id = await started_env(http, credits)
        plain = (await http.request("GET", "/status-env", json={"env_id": env_id})).json()
        assert set(plain) == ATROPOS_KEYS
        step = plain["current_step"]
        started = time.monotonic()
        r = await http.request(
            "GET", "/status-env", params={"wait": 0.4, "step": step, "queue": 0}, json={"env_id": env_id}
        )
        took = time.monotonic() - started
        assert r.status_code == 200 and took >= 0.35, took
        answer = r.json()
        assert set(answer) == ATROPOS_KEYS | {"trainer_waiting", "trainer_wait_seconds", "policy_version"}
        # The credit given at registration is still outstanding: the trainer waits.
        assert answer["trainer_waiting"] == 1 and answer["trainer_wait_seconds"] >= 0.35
        # A changed step answers at once; an unknown env as the plain route does.
        # (Asked to wait 3 x TIMEOUT: answered within TIMEOUT means it did not wait.)
        changed = {"wait": 3 * TIMEOUT, "step": step + 7}
        r = await asyncio.wait_for(http.request("GET", "/status-env", params=changed, json={"env_id": env_id}), TIMEOUT)
        assert r.status_code == 200
        # So does a committed policy newer than `version`; the same policy waits.
        newer = {"wait": 3 * TIMEOUT, "step": step, "version": answer["policy_version"] - 1}
        r = await asyncio.wait_for(http.request("GET", "/status-env", params=newer, json={"env_id": env_id}), TIMEOUT)
        assert r.status_code == 200
        same = {"wait": 0.3, "step": step, "version": answer["policy_version"]}
        started = time.monotonic()
        r = await http.request("GET", "/status-env", params=same, json={"env_id": env_id})
        assert r.status_code == 200 and time.monotonic() - started >= 0.25
        r = await http.request("GET", "/status-env", params={"wait": 5, "step": step}, json={"env_id": 99})
        plain_unknown = await http.request("GET", "/status-env", json={"env_id": 99})
        assert r.status_code == plain_unknown.status_code != 200
        # The trainer takes a batch: it no longer waits, and its waiting stops adding up.
        for i in range(2):
            assert (await http.post("/scored_data", json=group(i))).status_code == 200
        await credits.batch()
        first = (await http.request("GET", "/status-env", params={"wait": 0}, json={"env_id": env_id})).json()
        await asyncio.sleep(0.2)
        second = (await http.request("GET", "/status-env", params={"wait": 0}, json={"env_id": env_id})).json()
        assert first["trainer_waiting"] == second["trainer_waiting"] == 0
        assert second["trainer_wait_seconds"] == first["trainer_wait_seconds"]
        credits.queue.put_nowait(None)


async def test_a_waiting_long_poll_does_not_hold_up_shutdown() -> None:
    async with gateway() as (server, target, url), httpx.AsyncClient(base_url=url) as http:
        async with aio.insecure_channel(target) as channel:
            credits = Credits(gpb_grpc.GatewayServiceStub(channel))
            env_id = await started_env(http, credits)
            step = (await http.request("GET", "/status-env", json={"env_id": env_id})).json()["current_step"]
            poll = asyncio.ensure_future(
                http.request("GET", "/status-env", params={"wait": 30, "step": step}, json={"env_id": env_id})
            )
            await asyncio.sleep(0.3)
            assert not poll.done()
            credits.queue.put_nowait(None)
        await asyncio.wait_for(server.stop_http(), TIMEOUT)  # not the poll's 30 s
        answer = await asyncio.wait_for(poll, TIMEOUT)
        assert answer.status_code == 200 and answer.json()["current_step"] == step


async def test_against_atropos_own_server_the_env_falls_back_to_polling(tokenizer_dir) -> None:
    from atroposlib.api import server as atropos

    atropos.app.state._state.clear()
    try:
        transport = httpx.ASGITransport(app=atropos.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://atropos") as http:
            env = demo_env("http://atropos", tokenizer_dir, await started_env(http))
            env.batch_groups = 2
            room = env.room(http, 4)  # adaptive from 2 groups up to 4
            assert (room.limit, room.max_limit) == (2, 4)
            poller = asyncio.ensure_future(room.poll())
            try:
                await fill(room, http, 2)
                waiting = asyncio.ensure_future(room.acquire())
                await asyncio.sleep(0.2)
                # run-api answered at once without the extension: polling, Atropos' lead.
                assert room.watch is None and room.limit == 4
                await asyncio.wait_for(waiting, TIMEOUT)
                room.posted()
                assert (await http.post("/scored_data", json=group(2))).status_code == 200
                await fill(room, http, 1, tag=3)
                fifth = asyncio.ensure_future(room.acquire())
                await asyncio.sleep(0.1)
                assert not fifth.done()
                asked = room.requests
                batch = (await http.get("/batch")).json()["batch"]
                assert batch is not None and len(batch) == 2
                await asyncio.wait_for(fifth, TIMEOUT)
                assert room.requests > asked  # learned by polling
            finally:
                poller.cancel()
    finally:
        atropos.app.state._state.clear()
