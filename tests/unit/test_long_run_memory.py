"""What a long run keeps stays bounded: the threads a collective group tracks, the
step events `clotho up` summarises, the events the launcher keeps for a parent that
handles them itself (bench/soak.py measures the processes; these pin the causes)."""

from __future__ import annotations

import asyncio
import statistics
import threading
from typing import Any

from services.common.weight_wire.pipeline import in_daemon_thread
from services.up import Progress


async def test_tracked_threads_do_not_accumulate():
    track: list[threading.Thread] = []
    for i in range(50):
        assert await in_daemon_thread(lambda i=i: i * 2, name="t", track=track) == i * 2
    # Each finished thread is dropped when the next one is tracked.
    assert len(track) <= 2


def test_progress_summary_keeps_totals_not_every_step():
    progress = Progress(quiet=True)
    events: list[dict[str, Any]] = [
        {"event": "step", "mean_score": i / 100, "policy_version": i, "sync_seconds": 0.5, "sync_bytes": 1000}
        for i in range(1, 101)
    ]
    for event in events:
        progress.on_event("trainer", event)
    summary = progress.summary()
    rewards = [e["mean_score"] for e in events]
    assert summary["steps"] == 100 and summary["policy_version"] == 100
    assert summary["reward_start"] == statistics.fmean(rewards[:10])
    assert summary["reward_end"] == statistics.fmean(rewards[-10:])
    assert summary["sync_seconds_mean"] == 0.5 and summary["sync_bytes_per_second"] == 2000
    assert len(progress.first_rewards) == 10 and len(progress.last_rewards) == 10

    short = Progress(quiet=True)
    for event in events[:6]:
        short.on_event("trainer", event)
    assert short.summary()["reward_start"] == rewards[0] and short.summary()["reward_end"] == rewards[5]


async def test_launcher_keeps_events_only_without_a_handler(tmp_path):
    from services import launcher

    (tmp_path / "emit_events.py").write_text(
        "import json\nfor i in range(3):\n    print(json.dumps({'event': 'step', 'step': i}), flush=True)\n"
    )
    env = {"PYTHONPATH": str(tmp_path)}
    seen: list[dict] = []
    handled = await launcher.start("h", "emit_events", [], tmp_path, on_event=lambda _n, e: seen.append(e), env=env)
    kept = await launcher.start("k", "emit_events", [], tmp_path, env=env)
    for child in (handled, kept):
        await child.proc.wait()
        assert child.reader is not None
        await asyncio.wait_for(child.reader, 10)
    assert [e["step"] for e in seen] == [0, 1, 2] and handled.events == []
    assert [e["step"] for e in kept.events] == [0, 1, 2]
