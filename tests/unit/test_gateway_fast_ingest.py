"""The hot routes' short way into the app (/scored_data, /scored_data_list, /batch)
keeps the bearer-token check, the body limit and CORS of the full stack, and answers
what the full stack answers."""

from __future__ import annotations

import httpx

from services.gateway import auth
from services.gateway.atropos_api.batch_gzip import ResponseGzip
from services.gateway.generation.pool import InferencePool as InferenceClient
from services.gateway.http.app import create_app
from services.gateway.trajectory import TrajectoryState

TOKEN = "t-123"
GROUP = {"tokens": [[1, 2]], "masks": [[-100, 2]], "scores": [1.0]}


def client(max_body_bytes: int = 64 * 1024, response_gzip: ResponseGzip = "auto") -> httpx.AsyncClient:
    app = create_app(TrajectoryState(), InferenceClient([]), max_body_bytes=max_body_bytes, response_gzip=response_gzip)
    auth.install(app, TOKEN, None)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")


async def test_ingest_needs_the_trajectory_token():
    async with client() as c:
        for path, body in (("/scored_data", GROUP), ("/scored_data_list", [GROUP])):
            r = await c.post(path, json=body)
            assert r.status_code == 401 and r.json()["code"] == "UNAUTHENTICATED"
            r = await c.post(path, json=body, headers={"Authorization": "Bearer wrong"})
            assert r.status_code == 401
        # Nothing reached the state.
        status = await c.get("/status", headers={"Authorization": f"Bearer {TOKEN}"})
        assert status.json()["queue_size"] == 0
        r = await c.post("/scored_data", json=GROUP, headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200 and r.json() == {"status": "received"}
        assert (await c.get("/status", headers={"Authorization": f"Bearer {TOKEN}"})).json()["queue_size"] == 1


async def test_ingest_keeps_the_body_limit_and_cors():
    async with client(max_body_bytes=200) as c:
        auth_header = {"Authorization": f"Bearer {TOKEN}"}
        big = {**GROUP, "tokens": [[1] * 100], "masks": [[1] * 100]}
        r = await c.post("/scored_data", json=big, headers=auth_header)
        assert r.status_code == 413 and r.json()["code"] == "RESOURCE_EXHAUSTED"
        r = await c.post("/scored_data", json=GROUP, headers={**auth_header, "Origin": "http://x"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://x"


async def test_batch_answers_what_the_full_stack_answers():
    """Same-origin /batch calls take the short way, cross-origin ones the full stack
    (CORS, gzip middleware): bodies and headers agree, CORS's own headers aside."""
    auth_header = {"Authorization": f"Bearer {TOKEN}", "Accept-Encoding": "gzip"}
    row = list(range(600))
    big = {"tokens": [row], "masks": [row], "scores": [1.0]}
    for policy in ("always", "never"):
        async with client(response_gzip=policy) as c:
            await c.post(
                "/register",
                headers=auth_header,
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
            for tag in range(4):
                await c.post("/scored_data", headers=auth_header, json={**big, "scores": [float(tag)]})
            answers = []
            for origin in (None, "http://x", None, "http://x", None):
                headers = {**auth_header, **({"Origin": origin} if origin else {})}
                r = await c.get("/batch", headers=headers)
                assert r.status_code == 200
                kept = {k: v for k, v in r.headers.items() if not k.startswith("access-control-")}
                answers.append((kept, r.json()))
            assert [a[1]["batch"] and a[1]["batch"][0]["scores"] for a in answers] == [[3.0], [2.0], [1.0], [0.0], None]
            for kept, _ in answers[:4]:
                assert kept == answers[0][0], policy
            assert ("content-encoding" in answers[0][0]) is (policy == "always")
            assert answers[4][0]["vary"] == "Origin"  # {"batch":null} is too small to compress
            # Without the token the short way refuses too.
            assert (await c.get("/batch")).status_code == 401
