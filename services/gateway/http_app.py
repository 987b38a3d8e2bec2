"""The gateway's HTTP face: Atropos' trajectory API routes, same paths, JSON shapes and
quirks (`/status-env` is a GET with a JSON body; `/register-env` answers "wait for
trainer to start" until the trainer asked for a batch; `/batch` drains every full
batch), plus SGLang's `/generate` (http_generate.py).
"""

from __future__ import annotations

import json
import logging
from typing import Any, Optional

import orjson
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.middleware.gzip import GZipMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, Field

from services.common.errors import FailedPrecondition, NotFound
from services.gateway import http_errors
from services.gateway.http_body import RequestBodyMiddleware
from services.gateway.http_generate import generate_router
from services.gateway.inference_client import InferenceClient
from services.gateway.scored_data import parse_scored_data, parse_scored_data_list
from services.gateway.state import EnvRegistration, TrainerRegistration, TrajectoryState

log = logging.getLogger(__name__)

# What Atropos answers on /latest_example before any data arrived.
EMPTY_EXAMPLE = {
    "tokens": [],
    "masks": [],
    "scores": [],
    "advantages": [],
    "ref_logprobs": [],
    "generation_params": [],
    "inference_logprobs": [],
    "messages": [],
    "images": [],
}


class FastJSONResponse(Response):
    """JSON via orjson for batch-sized payloads (falls back to json for integers
    orjson cannot hold)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        try:
            return orjson.dumps(content)
        except TypeError:
            return json.dumps(content, separators=(",", ":")).encode()


class Registration(BaseModel):
    wandb_group: str
    wandb_project: str
    batch_size: int
    max_token_len: int
    checkpoint_dir: str
    save_checkpoint_interval: int
    starting_step: int
    num_steps: int


class RegisterEnv(BaseModel):
    max_token_length: int
    desired_name: str
    weight: float
    group_size: int = Field(ge=1)
    min_batch_allocation: Optional[float] = Field(None, ge=0.0, le=1.0)


class EnvIdentifier(BaseModel):
    env_id: int


def create_app(state: TrajectoryState, inference: InferenceClient, max_body_bytes: int) -> FastAPI:
    app = FastAPI(title="Clotho gateway (AtroposLib API)")
    http_errors.install(app)
    # Starlette runs the last added middleware first: bodies are bounded and inflated
    # before anything else reads them.
    app.add_middleware(
        CORSMiddleware, allow_origins=["*"], allow_credentials=True, allow_methods=["*"], allow_headers=["*"]
    )
    app.add_middleware(GZipMiddleware, minimum_size=1000, compresslevel=1)
    app.add_middleware(RequestBodyMiddleware, max_bytes=max_body_bytes)

    @app.get("/")
    async def root() -> dict:
        return {"message": "AtroposLib API"}

    @app.post("/register")
    async def register(registration: Registration) -> JSONResponse:
        requester = state.register_trainer(TrainerRegistration(**registration.model_dump()))
        return JSONResponse({"uuid": requester})

    @app.post("/register-env")
    async def register_env(body: RegisterEnv) -> dict:
        registered = state.register_env(EnvRegistration(**body.model_dump()))
        if registered is None:
            return {"status": "wait for trainer to start"}
        return {
            "status": "success",
            "env_id": registered.env_id,
            "wandb_name": registered.wandb_name,
            "checkpoint_dir": registered.checkpoint_dir,
            "starting_step": registered.starting_step,
            "checkpoint_interval": registered.checkpoint_interval,
            "num_steps": registered.num_steps,
        }

    @app.post("/disconnect-env")
    async def disconnect_env(body: EnvIdentifier) -> dict:
        try:
            state.disconnect_env(body.env_id)
        except NotFound as exc:
            return {"status": "failure", "error": str(exc)}
        return {"status": "success"}

    @app.get("/wandb_info")
    async def wandb_info() -> dict:
        trainer = state.trainer
        if trainer is None:
            return {"group": None, "project": None}
        return {"group": trainer.wandb_group, "project": trainer.wandb_project}

    @app.get("/info")
    async def info() -> dict:
        trainer = state.trainer
        if trainer is None:
            return {"batch_size": -1, "max_token_len": -1}
        return {"batch_size": trainer.batch_size, "max_token_len": trainer.max_token_len}

    @app.get("/batch")
    async def batch() -> Response:
        try:
            taken = state.take_batch()
        except FailedPrecondition:
            return FastJSONResponse(
                {"status": "error", "message": "Trainer not registered. Call /register first.", "batch": []}
            )
        if taken is not None:
            log.info("sending batch of %d sequences (step %d)", sum(len(g["tokens"]) for g in taken), state.step)
        return FastJSONResponse({"batch": taken})

    @app.get("/latest_example")
    async def latest_example() -> Response:
        latest = state.latest_example()
        return FastJSONResponse(latest if latest is not None else EMPTY_EXAMPLE)

    @app.post("/scored_data")
    async def scored_data(request: Request) -> dict:
        group = parse_scored_data(await request.body())
        (outcome,) = state.submit([group])
        if outcome.buffered:
            return {"status": "buffered", "buffer_size": outcome.buffer_size}
        return {"status": "received"}

    @app.post("/scored_data_list")
    async def scored_data_list(request: Request) -> dict:
        groups = parse_scored_data_list(await request.body())
        outcomes = state.submit(groups)
        response: dict[str, Any] = {"status": "received", "groups_processed": len(groups)}
        buffered = [o for o in outcomes if o.buffered]
        if buffered:
            response["buffered"] = len(buffered)
            response["last_buffer_size"] = buffered[-1].buffer_size
        return response

    @app.get("/status")
    async def status() -> dict:
        return {"current_step": state.step, "queue_size": state.queue_size}

    @app.get("/status-env")
    async def status_env(env: EnvIdentifier) -> dict:
        s = state.env_status(env.env_id)
        return {
            "current_step": s.current_step,
            "queue_size": s.queue_size,
            "unallocated_fraction": s.unallocated_fraction,
            "self_queue_size": s.self_queue_size,
            "max_group_size": s.max_group_size,
            "env_weight": s.env_weight,
        }

    @app.get("/reset_data")
    async def reset_data() -> PlainTextResponse:
        state.reset()
        return PlainTextResponse("Reset successful", status_code=200)

    app.include_router(generate_router(inference))
    return app
