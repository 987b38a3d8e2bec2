"""A frozen inference process (SIGSTOP) behind a real gateway with a second, healthy
one: the gateway's /health answers at once, the frozen target is noticed within its
probe deadline, and /generate (both dialects, streaming or not) is served by the other
target or fails fast, never waiting out the 600 s call timeout. SIGCONT brings it back."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import pytest
import pytest_asyncio

pytestmark = pytest.mark.asyncio(loop_scope="module")

PROBE_TIMEOUT = 2.0
# Far below the gateway's 600 s call timeout; generous for a loaded CI machine.
FAST = 30.0


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh(tiny_model_dir, tmp_path_factory, service_process):
    """Two inference processes behind one gateway: (http client, [(pid, address)])."""
    args = ["--model-path", str(tiny_model_dir), "--grpc-port", "0", "--grace-seconds", "1"]
    env_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        async with (
            service_process("services.inference", args, tmp_path_factory.mktemp("inf-a")) as (a, ready_a),
            service_process("services.inference", args, tmp_path_factory.mktemp("inf-b")) as (b, ready_b),
        ):
            shards = [
                (a.proc.pid, f"127.0.0.1:{ready_a['grpc_port']}"),
                (b.proc.pid, f"127.0.0.1:{ready_b['grpc_port']}"),
            ]
            home = tmp_path_factory.mktemp("gateway")
            gateway_args = [
                "--http-port",
                "0",
                "--grpc-port",
                "0",
                "--inference",
                ",".join(address for _, address in shards),
                "--tokenizer-path",
                str(tiny_model_dir),
                "--inference-probe-timeout-seconds",
                str(PROBE_TIMEOUT),
                "--inference-eject-seconds",
                "2",
                "--grace-seconds",
                "1",
                "--data-dir",
                str(home / "store"),
            ]
            async with service_process("services.gateway", gateway_args, home) as (_, ready):
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ready['http_port']}", timeout=120) as http:
                    yield http, shards
    finally:
        if env_threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env_threads


async def targets(http: httpx.AsyncClient) -> dict[str, dict]:
    r = await http.get("/health")
    return {t["target"]: t for t in r.json()["targets"]} if r.status_code == 200 else {}


async def wait_for(condition, what: str, deadline: float = 60.0) -> None:
    end = time.monotonic() + deadline
    while not await condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


def generate_body(stream: bool, tokens: int = 24) -> dict:
    return {
        "input_ids": [5, 6, 7],
        "sampling_params": {"max_new_tokens": tokens, "temperature": 1.0, "ignore_eos": True},
        "stream": stream,
    }


async def timed_post(http: httpx.AsyncClient, path: str, body: dict) -> tuple[int, float, str]:
    start = time.monotonic()
    r = await http.post(path, json=body)
    return r.status_code, time.monotonic() - start, r.text


async def test_frozen_inference_process_is_ejected_and_generate_is_served_elsewhere(mesh):
    http, shards = mesh
    (frozen_pid, frozen), (_, alive) = shards

    async def both_healthy() -> bool:
        t = await targets(http)
        return bool(t) and all(t[address]["healthy"] for _, address in shards)

    await wait_for(both_healthy, "both targets to be healthy")
    # Requests in flight on both targets when one freezes.
    in_flight = [asyncio.create_task(timed_post(http, "/generate", generate_body(i % 2 == 0, 48))) for i in range(8)]
    await asyncio.sleep(0.05)
    os.kill(frozen_pid, signal.SIGSTOP)
    try:
        # /health answers from what the router knows, without waiting on the frozen engine.
        start = time.monotonic()
        assert (await http.get("/health")).status_code == 200
        assert time.monotonic() - start < 5.0

        for status, seconds, text in await asyncio.gather(*in_flight):
            assert seconds < FAST, f"a request in flight took {seconds:.1f}s"
            assert status in (200, 503, 504), text

        async def frozen_reported() -> bool:
            return "unresponsive" in (await targets(http)).get(frozen, {}).get("reason", "")

        await wait_for(frozen_reported, "the frozen target to be reported unresponsive", deadline=FAST)
        start = time.monotonic()
        assert (await http.get("/health")).status_code == 200
        assert time.monotonic() - start < 5.0

        # New calls, each dialect, streaming or not: served by the healthy target, fast.
        calls = [
            ("/generate", generate_body(False)),
            ("/generate", generate_body(True)),
            ("/generate", {"prompt": {"prompt_token_ids": [5, 6]}, "max_tokens": 4}),
            ("/v1/completions", {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 4}),
            ("/v1/completions", {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 4, "stream": True}),
        ]
        for _ in range(2):
            for path, body in calls:
                status, seconds, text = await timed_post(http, path, body)
                assert status == 200, f"{path}: {text}"
                assert seconds < FAST
        assert (await targets(http))[alive]["healthy"]
    finally:
        os.kill(frozen_pid, signal.SIGCONT)

    async def frozen_back() -> bool:
        return (await targets(http)).get(frozen, {}).get("healthy") is True

    await wait_for(frozen_back, "the resumed target to be healthy again")


async def test_generate_fails_fast_when_the_only_healthy_target_freezes(mesh):
    """With every target frozen there is nowhere to retry: 503/504 well before 600 s."""
    http, shards = mesh
    pids = [pid for pid, _ in shards]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        pending = [asyncio.create_task(timed_post(http, "/generate", generate_body(s))) for s in (False, True)]
        for status, seconds, text in await asyncio.gather(*pending):
            assert status in (503, 504), text
            assert seconds < FAST
        start = time.monotonic()
        assert (await http.get("/health")).status_code in (503, 504)
        assert time.monotonic() - start < 5.0
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)

    async def all_back() -> bool:
        t = await targets(http)
        return bool(t) and all(t[address]["healthy"] for _, address in shards)

    await wait_for(all_back, "every target to be healthy again")
