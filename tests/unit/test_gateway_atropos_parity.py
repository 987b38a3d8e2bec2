"""The gateway's REST routes against Atropos' own server (the installed atroposlib),
in process: the same requests in the same order must get the same answers."""

from __future__ import annotations

import gzip
import json
import random
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from atroposlib.api import server as atropos

from services.gateway.generation.pool import InferencePool as InferenceClient
from services.gateway.http.app import create_app
from services.gateway.trajectory import TrajectoryState

REGISTRATION = {
    "wandb_group": "group",
    "wandb_project": "project",
    "batch_size": 8,
    "max_token_len": 512,
    "checkpoint_dir": "/tmp/ckpt",
    "save_checkpoint_interval": 10,
    "starting_step": 3,
    "num_steps": 100,
}


def env(name, group_size, weight=1.0, max_len=256, min_alloc=None):
    body = {"max_token_length": max_len, "desired_name": name, "weight": weight, "group_size": group_size}
    if min_alloc is not None:
        body["min_batch_allocation"] = min_alloc
    return body


def group(size, env_id=None, seed=0, extras=False):
    rng = random.Random(seed)
    tokens = [[rng.randrange(1000) for _ in range(rng.randint(1, 5))] for _ in range(size)]
    body = {
        "tokens": tokens,
        "masks": [[-100] + t[1:] for t in tokens],
        "scores": [rng.choice([0, 1, 0.5]) for _ in range(size)],
        "env_id": env_id,
    }
    if extras:
        body["advantages"] = [[0.25] * len(t) for t in tokens]
        body["messages"] = [[{"role": "user", "content": f"q{seed}"}] for _ in tokens]
        body["generation_params"] = {"temperature": 1.0}
        body["overrides"] = [{"set_advantage_to_zero": False} for _ in tokens]
    return body


@pytest.fixture
def apps():
    atropos.app.state._state.clear()
    ours = create_app(TrajectoryState(), InferenceClient([]), max_body_bytes=64 * 1024 * 1024)
    yield atropos.app, ours
    atropos.app.state._state.clear()


@dataclass
class Gzipped:
    """A JSON body sent gzip-compressed (Content-Encoding: gzip)."""

    body: object


async def run_both(apps, steps):
    """Send each step to both servers; compare status and JSON (uuids by shape).
    Where Atropos itself crashes (a 500, e.g. /status-env once every env is
    disconnected) the gateway must answer, and the session goes on."""
    ref_app, our_app = apps
    async with (
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=ref_app, raise_app_exceptions=False), base_url="http://ref"
        ) as ref,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=our_app), base_url="http://ours") as ours,
    ):
        for method, path, body in steps:
            kwargs = {"json": body} if body is not None else {}
            if isinstance(body, Gzipped):
                body = body.body
                kwargs = {
                    "content": gzip.compress(json.dumps(body).encode()),
                    "headers": {"content-encoding": "gzip", "content-type": "application/json"},
                }
            a = await ref.request(method, path, **kwargs)
            b = await ours.request(method, path, **kwargs)
            where = f"{method} {path} {json.dumps(body)[:200]}"
            if a.status_code == 500:
                assert b.status_code < 500, where
                continue
            assert a.status_code == b.status_code, where
            if path == "/reset_data":
                assert a.text == b.text
                continue
            ja, jb = a.json(), b.json()
            if path == "/register":
                assert isinstance(ja["uuid"], int) and isinstance(jb["uuid"], int)
                continue
            assert ja == jb, where
            if path == "/batch":
                assert a.content == b.content, where


async def test_flow_with_buffering_and_draining_matches_atropos(apps):
    steps = [
        ("GET", "/", None),
        ("GET", "/status", None),
        ("GET", "/info", None),
        ("GET", "/wandb_info", None),
        ("GET", "/latest_example", None),
        ("GET", "/batch", None),
        ("POST", "/register", REGISTRATION),
        ("POST", "/register", REGISTRATION),
        ("GET", "/info", None),
        ("GET", "/wandb_info", None),
        ("POST", "/register-env", env("gsm8k", 4)),
        ("GET", "/batch", None),
        ("POST", "/register-env", env("gsm8k", 4)),
        ("POST", "/register-env", env("gsm8k", 2, weight=0.5, max_len=1024)),
        ("POST", "/register-env", env("code", 1, weight=2.0)),
        # env 0 expects groups of 4: a 2 is buffered, a 3 is buffered, a second 2
        # completes 4 with the first (first fit), the 3 waits; a 1 completes it.
        ("POST", "/scored_data", group(2, env_id=0, seed=1)),
        ("POST", "/scored_data", group(3, env_id=0, seed=2)),
        ("POST", "/scored_data", group(2, env_id=0, seed=3)),
        ("GET", "/status", None),
        ("POST", "/scored_data", group(1, env_id=0, seed=4)),
        ("POST", "/scored_data", group(4, env_id=0, seed=5, extras=True)),
        ("POST", "/scored_data", group(2, env_id=1, seed=6)),
        ("POST", "/scored_data", group(1, env_id=2, seed=7)),
        ("POST", "/scored_data", group(2, env_id=None, seed=8)),
        ("POST", "/scored_data", group(2, env_id=17, seed=9)),
        ("POST", "/scored_data_list", [group(1, env_id=2, seed=s) for s in range(10, 17)]),
        (
            "POST",
            "/scored_data_list",
            [group(2, env_id=0, seed=20), group(1, env_id=0, seed=21), group(4, env_id=0, seed=22)],
        ),
        ("GET", "/status", None),
        ("GET", "/status-env", {"env_id": 0}),
        ("GET", "/status-env", {"env_id": 1}),
        ("GET", "/status-env", {"env_id": 2}),
        ("GET", "/latest_example", None),
        # Several batches are formed at once; the step jumps by their number and the
        # rest are handed out by later calls.
        ("GET", "/batch", None),
        ("GET", "/status", None),
        ("GET", "/batch", None),
        ("GET", "/batch", None),
        ("GET", "/batch", None),
        ("GET", "/batch", None),
        ("GET", "/status", None),
        ("POST", "/disconnect-env", {"env_id": 1}),
        ("GET", "/status-env", {"env_id": 0}),
        ("GET", "/reset_data", None),
        ("GET", "/status", None),
        ("GET", "/wandb_info", None),
        ("GET", "/latest_example", None),
    ]
    await run_both(apps, steps)


async def test_min_batch_allocation_flow_matches_atropos(apps):
    steps = [
        ("POST", "/register", {**REGISTRATION, "batch_size": 8}),
        ("GET", "/batch", None),
        ("POST", "/register-env", env("a", 2, min_alloc=0.5)),
        ("POST", "/register-env", env("b", 2)),
        ("POST", "/register-env", env("c", 4, min_alloc=0.25, weight=3.0)),
    ]
    rng = random.Random(3)
    for k in range(40):
        env_id = rng.choice([0, 1, 1, 2])
        size = {0: 2, 1: 2, 2: 4}[env_id]
        steps.append(("POST", "/scored_data", group(size, env_id=env_id, seed=100 + k)))
        if k % 5 == 4:
            steps += [
                ("GET", "/status-env", {"env_id": rng.randrange(3)}),
                ("GET", "/batch", None),
                ("GET", "/status", None),
            ]
    steps += [("GET", "/batch", None)] * 4 + [("GET", "/status", None)]
    await run_both(apps, steps)


@pytest.mark.parametrize("seed", range(6))
async def test_random_sessions_match_atropos(apps, seed):
    rng = random.Random(seed)
    # (method, path, JSON body): a body is an object, a list of them, or none.
    steps: list[tuple[str, str, Any]] = [
        ("POST", "/register", {**REGISTRATION, "batch_size": rng.choice([4, 8, 16])}),
        ("GET", "/batch", None),
    ]
    n_envs = rng.randint(1, 3)
    sizes = {}
    for e in range(n_envs):
        sizes[e] = rng.choice([1, 2, 4, 8])
        min_alloc = rng.choice([None, None, 0.25, 0.5])
        steps.append(
            (
                "POST",
                "/register-env",
                env(f"e{e % 2}", sizes[e], weight=rng.choice([0.5, 1.0, 2.0]), min_alloc=min_alloc),
            )
        )
    connected = set(range(n_envs))
    for k in range(60):
        roll = rng.random()
        env_id = rng.randrange(n_envs)
        if roll < 0.55:
            size = sizes[env_id] if rng.random() < 0.7 else rng.choice([1, 2, 3, 4, 8])
            steps.append(("POST", "/scored_data", group(size, env_id=env_id, seed=seed * 1000 + k)))
        elif roll < 0.65:
            items = [
                group(rng.choice([1, 2, 4]), env_id=rng.randrange(n_envs), seed=seed * 1000 + k * 10 + j)
                for j in range(3)
            ]
            steps.append(("POST", "/scored_data_list", items))
        elif roll < 0.8:
            steps.append(("GET", "/status-env", {"env_id": env_id}))
        elif roll < 0.95:
            steps += [("GET", "/batch", None), ("GET", "/status", None)]
        elif len(connected) > 1:
            # Atropos divides by zero on /status-env once no env is connected.
            connected.discard(env_id)
            steps.append(("POST", "/disconnect-env", {"env_id": env_id}))
    steps += [("GET", "/latest_example", None), ("GET", "/status", None)]
    await run_both(apps, steps)


def every_field(size, env_id, seed):
    """A group with every optional ScoredData field, lax types (ints for floats) and
    numbers Python's json writes differently from orjson (1e-05, 1e+16)."""
    rng = random.Random(seed)
    tokens = [[rng.randrange(1000) for _ in range(3)] for _ in range(size)]
    return {
        "tokens": tokens,
        "masks": [[-100, t[1], t[2]] for t in tokens],
        "scores": [1, 0.5][:size] + [0] * max(0, size - 2),
        "advantages": [[0.1, -2, 1e-05] for _ in tokens],
        "ref_logprobs": [[-0.5, -1.25e-07, 0] for _ in tokens],
        "inference_logprobs": [[-0.25, -3, -1e16] for _ in tokens],
        "messages": [
            [{"role": "user", "content": "héllo ✓"}, {"role": "assistant", "content": "4", "reward": 1}] for _ in tokens
        ],
        "generation_params": {"temperature": 0.7, "top_p": 1, "stop": ["\n"]},
        "overrides": [{"set_advantage_to_zero": i % 2 == 0} for i in range(size)],
        "group_overrides": {"group_size": size, "note": None},
        "images": ["data:image/png;base64,AAAA", {"nested": [1, 2.5]}],
        "env_id": env_id,
        "distill_token_ids": [[[1, 2], [3, 4], [5, 6]] for _ in tokens],
        "distill_logprobs": [[[-0.1, -2.5], [-1e-06, -3], [0, -1]] for _ in tokens],
    }


async def test_every_optional_field_plain_and_gzipped_matches_atropos(apps):
    steps = [
        ("POST", "/register", {**REGISTRATION, "batch_size": 4}),
        ("GET", "/batch", None),
        ("POST", "/register-env", env("all", 2)),
        ("POST", "/scored_data", every_field(2, 0, seed=1)),
        ("GET", "/latest_example", None),
        ("POST", "/scored_data", Gzipped(every_field(2, 0, seed=2))),
        ("POST", "/scored_data_list", Gzipped([every_field(1, 0, seed=3), every_field(1, 0, seed=4)])),
        ("POST", "/scored_data_list", [every_field(2, None, seed=5), every_field(2, 0, seed=6)]),
        # Only small floats that orjson alone would write as 0.0000999 and 1.5e-6.
        (
            "POST",
            "/scored_data",
            {
                **group(4, env_id=None, seed=7),
                "inference_logprobs": [[-9.99e-05, -1.5e-06]] * 4,
                "tokens": [[1, 2]] * 4,
                "masks": [[-100, 2]] * 4,
            },
        ),
        ("GET", "/latest_example", None),
        ("GET", "/status", None),
        ("GET", "/batch", None),
        ("GET", "/batch", None),
        ("GET", "/status", None),
        ("GET", "/batch", None),
        ("GET", "/batch", None),
        ("GET", "/reset_data", None),
        ("GET", "/info", None),
        ("GET", "/latest_example", None),
        ("GET", "/status", None),
    ]
    await run_both(apps, steps)


def default_collect_group(size, env_id, seed, overrides=None):
    """What BaseEnv's default collect_trajectories sends (environments that implement
    only collect_trajectory): the optional per-sequence fields start as [] and stay
    empty unless the rollouts returned some; group_overrides merges theirs."""
    g = group(size, env_id=env_id, seed=seed)
    g.update(
        advantages=[],
        ref_logprobs=[],
        messages=[],
        overrides=[],
        images=[],
        group_overrides=overrides if overrides is not None else {},
    )
    g.pop("inference_logprobs", None)
    return g


async def test_basenv_default_group_shape_matches_atropos(apps):
    steps = [
        ("POST", "/register", {**REGISTRATION, "batch_size": 4}),
        ("GET", "/batch", None),
        ("POST", "/register-env", env("default", 2)),
        ("POST", "/scored_data", default_collect_group(2, 0, seed=1)),
        ("POST", "/scored_data", default_collect_group(2, 0, seed=2, overrides={"group_size": 2, "note": "x"})),
        ("POST", "/scored_data_list", [default_collect_group(2, 0, seed=3), default_collect_group(2, None, seed=4)]),
        ("GET", "/latest_example", None),
        ("GET", "/batch", None),
        ("GET", "/batch", None),
        ("GET", "/status", None),
    ]
    await run_both(apps, steps)
