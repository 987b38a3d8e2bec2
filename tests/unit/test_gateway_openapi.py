"""The served OpenAPI document carries every route's request and response body (the
ingest and inference routes parse by hand, so their schemas are declared in
services/gateway/http/openapi_doc.py), without touching the fast ingest path."""

from __future__ import annotations

import httpx
from fastapi.routing import APIRoute
from starlette.routing import Route

from services.gateway.generation.pool import InferencePool
from services.gateway.http.app import GatewayApp, create_app
from services.gateway.trajectory import TrajectoryState
from services.gateway.trajectory.scored_data import ScoredData

BODIES = {
    ("post", "/scored_data"): "ScoredData",
    ("post", "/scored_data_list"): None,
    ("post", "/generate"): None,
    ("post", "/v1/completions"): "CompletionRequest",
    ("post", "/v1/chat/completions"): "ChatCompletionRequest",
    ("post", "/register"): "Registration",
    ("post", "/register-env"): "RegisterEnv",
}


async def test_every_route_has_its_bodies():
    app = create_app(TrajectoryState(), InferencePool([]), max_body_bytes=1 << 20)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        doc = (await client.get("/openapi.json")).json()
    paths = doc["paths"]
    served = {
        (method.lower(), route.path.replace("{model_id:path}", "{model_id}"))
        for route in app.routes
        if isinstance(route, (APIRoute, Route)) and route.include_in_schema
        for method in route.methods or ()
        if method != "HEAD"
    }
    assert {("post", "/scored_data"), ("post", "/scored_data_list"), ("get", "/batch")} <= served
    for method, path in served:
        assert method in paths.get(path, {}), (method, path)
        op = paths[path][method]
        ok = op["responses"]["200"]
        assert ok.get("content"), (method, path, "no 200 body")
        if method == "post":
            assert op["requestBody"]["content"]["application/json"]["schema"], (method, path)
    for (method, path), name in BODIES.items():
        schema = paths[path][method]["requestBody"]["content"]["application/json"]["schema"]
        if name is not None:
            assert schema == {"$ref": f"#/components/schemas/{name}"}
    components = doc["components"]["schemas"]
    assert set(components["ScoredData"]["properties"]) == set(ScoredData.model_fields)
    assert components["ScoredData"]["required"] == ["tokens", "masks", "scores"]
    list_body = paths["/scored_data_list"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert list_body == {"type": "array", "items": {"$ref": "#/components/schemas/ScoredData"}}
    assert "oneOf" in paths["/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    batch = paths["/batch"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert batch == {"$ref": "#/components/schemas/BatchReply"}
    # The ingest routes still take the fast entry (documented, not parsed by FastAPI).
    assert isinstance(app, GatewayApp)
    assert ("POST", "/scored_data") in app.fast_paths and ("GET", "/batch") in app.fast_paths
