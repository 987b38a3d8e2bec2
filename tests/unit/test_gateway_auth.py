"""Bearer tokens, one per route family: trajectory routes and inference routes are
guarded apart (stock Atropos environments send a token only to inference), refusals
are 401 with a JSON body, probes stay open, and the body limit covers the inference
routes (413 in OpenAI's error shape on /v1/*)."""

from __future__ import annotations

import gzip
import json

import httpx
import pytest

from services.common.settings import load_settings
from services.gateway import auth
from services.gateway.generation.pool import InferencePool as InferenceClient
from services.gateway.http.app import create_app
from services.gateway.settings import GatewaySettings
from services.gateway.trajectory import TrajectoryState

TRAJ, INF = "traj-secret", "inf-secret"
REGISTRATION = {
    "wandb_group": "g",
    "wandb_project": "p",
    "batch_size": 4,
    "max_token_len": 64,
    "checkpoint_dir": "",
    "save_checkpoint_interval": 1,
    "starting_step": 0,
    "num_steps": 1,
}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def client_for(trajectory_token=None, inference_token=None, max_body_bytes=64 * 1024) -> httpx.AsyncClient:
    # As services.gateway.server.create_server builds it.
    app = create_app(TrajectoryState(), InferenceClient([]), max_body_bytes=max_body_bytes)
    auth.install(app, trajectory_token, inference_token)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")


@pytest.mark.parametrize("path", ["/register-env", "/generate", "/v1/models", "/v1/chat/completions", "/batch"])
def test_route_families(path):
    expected = auth.INFERENCE if path.startswith(("/v1", "/generate")) else auth.TRAJECTORY
    assert auth.route_family(path) == expected
    assert auth.route_family("/health") is None


async def test_trajectory_routes_need_the_trajectory_token():
    async with client_for(TRAJ, INF) as c:
        r = await c.get("/status")
        assert r.status_code == 401
        assert r.json() == {
            "error": "missing bearer token: /status needs 'Authorization: Bearer <trajectory_token>'",
            "code": "UNAUTHENTICATED",
        }
        assert r.headers["www-authenticate"].startswith("Bearer")
        wrong = await c.post("/register", json=REGISTRATION, headers=bearer(INF))
        assert wrong.status_code == 401 and "wrong bearer token" in wrong.json()["error"]
        assert TRAJ not in wrong.text and INF not in wrong.text
        assert (await c.post("/register", json=REGISTRATION, headers=bearer(TRAJ))).status_code == 200
        assert (await c.get("/status", headers=bearer(TRAJ))).json()["current_step"] == 0
        assert (await c.get("/status", headers={"Authorization": f"bearer {TRAJ}"})).status_code == 200


async def test_inference_routes_need_the_inference_token_in_openai_shape():
    async with client_for(TRAJ, INF) as c:
        r = await c.post("/v1/chat/completions", json={"messages": []})
        assert r.status_code == 401
        error = r.json()["error"]
        assert error["code"] == "invalid_api_key" and error["type"] == "authentication_error"
        assert "inference_token" in error["message"]
        r = await c.get("/v1/models", headers=bearer(TRAJ))
        assert r.status_code == 401 and "wrong bearer token" in r.json()["error"]["message"]
        assert (await c.post("/generate", json={"input_ids": [1]})).status_code == 401
        # Past the check, the request reaches the route (no inference behind it here: 503).
        r = await c.get("/v1/models", headers=bearer(INF))
        assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
        r = await c.post("/generate", json={"input_ids": [1]}, headers=bearer(INF))
        assert r.status_code == 503 and r.json()["code"] == "UNAVAILABLE"
        # Probes and CORS preflights stay open.
        assert (await c.get("/health")).status_code == 503
        preflight = await c.options(
            "/v1/models", headers={"Origin": "http://x", "Access-Control-Request-Method": "GET"}
        )
        assert preflight.status_code == 200


async def test_stock_atropos_setup_inference_token_only():
    async with client_for(None, INF) as c:
        assert (await c.post("/register", json=REGISTRATION)).status_code == 200
        assert (await c.get("/status")).status_code == 200
        assert (await c.get("/v1/models")).status_code == 401


async def test_no_tokens_no_checks():
    async with client_for() as c:
        assert (await c.get("/status")).status_code == 200
        assert (await c.get("/v1/models")).status_code == 503


async def test_body_limit_covers_inference_routes_and_auth_comes_first():
    big = {"messages": [{"role": "user", "content": "x" * 5000}]}
    async with client_for(None, INF, max_body_bytes=4096) as c:
        for path in ("/v1/chat/completions", "/v1/completions", "/generate"):
            r = await c.post(path, json=big, headers=bearer(INF))
            assert r.status_code == 413, (path, r.text)
            message = r.json()["error"]["message"] if path.startswith("/v1") else r.json()["error"]
            assert "max_body_bytes" in message
        # Without the token the body is never read: 401, not 413.
        assert (await c.post("/v1/chat/completions", json=big)).status_code == 401


async def test_body_errors_on_v1_are_openai_shaped():
    big = json.dumps({"messages": [{"role": "user", "content": "x" * 5000}]}).encode()
    async with client_for(max_body_bytes=4096) as c:
        # Too large by Content-Length, and only once inflated (gzip).
        for headers, content in (({}, big), ({"content-encoding": "gzip"}, gzip.compress(big))):
            r = await c.post(
                "/v1/chat/completions", content=content, headers={"content-type": "application/json", **headers}
            )
            assert r.status_code == 413, r.text
            assert r.json() == {
                "error": {
                    "message": "request body exceeds max_body_bytes (4096)",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "resource_exhausted",
                }
            }
            assert int(r.headers["content-length"]) == len(r.content)
        r = await c.post("/v1/completions", content=b"not gzip", headers={"content-encoding": "gzip"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        assert "invalid gzip body" in r.json()["error"]["message"]
        # Other paths keep the gateway's shape; /v1 errors already OpenAI-shaped are untouched.
        r = await c.post("/scored_data", content=big)
        assert r.status_code == 413 and r.json()["code"] == "RESOURCE_EXHAUSTED"
        r = await c.post("/generate", content=big)
        assert r.status_code == 413 and r.json()["code"] == "RESOURCE_EXHAUSTED"
        r = await c.get("/v1/models")
        assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"


def test_tokens_come_from_flags_and_env_and_stay_secret(monkeypatch):
    monkeypatch.setenv("CLOTHO_GATEWAY_INFERENCE_TOKEN", INF)
    s = load_settings(GatewaySettings, ["--trajectory-token", TRAJ])
    assert s.trajectory_token is not None and s.inference_token is not None
    assert s.trajectory_token.get_secret_value() == TRAJ
    assert s.inference_token.get_secret_value() == INF
    assert TRAJ not in repr(s) and INF not in repr(s)
    monkeypatch.delenv("CLOTHO_GATEWAY_INFERENCE_TOKEN")
    s = load_settings(GatewaySettings, [])
    assert s.trajectory_token is None and s.inference_token is None
