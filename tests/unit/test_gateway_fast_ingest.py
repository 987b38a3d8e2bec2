"""The ingest routes' short way into the app keeps the bearer-token check, the body
limit and CORS of the full stack."""

from __future__ import annotations

import httpx

from services.gateway import auth
from services.gateway.http_app import create_app
from services.gateway.inference_client import InferenceClient
from services.gateway.state import TrajectoryState

TOKEN = "t-123"
GROUP = {"tokens": [[1, 2]], "masks": [[-100, 2]], "scores": [1.0]}


def client(max_body_bytes: int = 64 * 1024) -> httpx.AsyncClient:
    app = create_app(TrajectoryState(), InferenceClient([]), max_body_bytes=max_body_bytes)
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
