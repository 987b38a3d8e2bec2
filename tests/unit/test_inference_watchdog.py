"""A torch shard whose engine is wedged (a step that does not return while work waits)
reports NOT_SERVING from its watchdog, while the event loop (and so gRPC health) stays
responsive; it serves again once the engine moves. An idle engine is never wedged."""

from __future__ import annotations

import asyncio
import threading

import pytest

from services.inference.generation_types import GenerationRequest, SamplingOptions
from services.inference.torch_engine.engine import GenerationEngine
from services.inference.torch_engine.loader import WeightReceiver
from services.inference.torch_engine.shard import TorchShard
from waiting import wait_until


@pytest.fixture
def engine(tiny_model_dir):
    engine = GenerationEngine(tiny_model_dir, max_batch_size=4)
    yield engine
    engine.close()


async def test_wedged_engine_reports_not_serving_and_recovers(engine):
    shard = TorchShard(engine, WeightReceiver(engine, 10.0), stall_seconds=0.5, watchdog_seconds=0.05)
    reports: list[tuple[bool, str]] = []
    shard.set_health_listener(lambda serving, reason: reports.append((serving, reason)))
    await shard.start()
    try:
        # Idle well past the stall limit: not wedged.
        await asyncio.sleep(0.8)
        assert shard.serving and engine.stalled_seconds() == 0.0 and reports == []

        release = threading.Event()
        real_step = engine._batch.step

        def hung_step(version: int) -> None:
            release.wait(30)
            real_step(version)

        engine._batch.step = hung_step
        request = GenerationRequest(input_ids=[5, 6, 7], sampling=SamplingOptions(max_new_tokens=3, ignore_eos=True))
        stream = engine.submit(request)
        await wait_until(lambda: not shard.serving, timeout=10)
        assert reports[-1][0] is False and "no progress" in reports[-1][1]
        # (The wait above already shows the event loop answers while the engine thread is stuck.)

        release.set()
        completions = await asyncio.wait_for(stream.completions(), 30)
        assert len(completions[0].output_ids) == 3
        await wait_until(lambda: shard.serving, timeout=10)
        assert reports[-1] == (True, "")
    finally:
        await shard.close()
