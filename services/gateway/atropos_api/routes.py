"""Atropos' trajectory API routes, same paths, JSON shapes and quirks as
atroposlib's server (`/status-env` is a GET with a JSON body; `/register-env` answers
"wait for trainer to start" until the trainer asked for a batch; `/batch` drains
every full batch).

Every route that changes the state goes through `DurableState` and answers once the
change is durable. The hot routes (`/scored_data`, `/scored_data_list`, `/batch`) are
plain Starlette routes: they read and write bytes themselves, and `/batch` splices the
groups' stored JSON into the reply instead of re-encoding them; the gzip middleware
finds the next batch compressed before it is asked for (batch_gzip.py). The same
handlers answer those three paths on the request-body middleware's fast entry
(http/body.py).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import orjson
from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, Field

from services.common.errors import FailedPrecondition, NotFound
from services.gateway.atropos_api.batch_gzip import BatchCompressor, wants_gzip
from services.gateway.trajectory.durable import DurableState
from services.gateway.trajectory.records import EnvRegistration, EnvStatus, TrainerRegistration
from services.gateway.trajectory.scored_data import read_group, read_group_list
from services.gateway.trajectory.tracing import handout_span

log = logging.getLogger(__name__)

# What Atropos answers on /latest_example before any data arrived.
EMPTY_EXAMPLE: dict[str, list[Any]] = {
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


EMPTY_EXAMPLE_JSON = orjson.dumps(EMPTY_EXAMPLE)
RECEIVED = b'{"status":"received"}'
NO_BATCH = b'{"batch":null}'
VARY_ORIGIN = (b"vary", b"Origin")
VARY_BOTH = (b"vary", b"Origin, Accept-Encoding")
GZIP_ENCODING = (b"content-encoding", b"gzip")
NOT_REGISTERED = orjson.dumps(
    {"status": "error", "message": "Trainer not registered. Call /register first.", "batch": []}
)


def batch_json(groups: list) -> bytes:
    return b'{"batch":[' + b",".join(g.body for g in groups) + b"]}"


def json_bytes(body: bytes) -> Response:
    return Response(body, media_type="application/json")


# Integers the store keeps as int64; beyond them a record could not be journaled.
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]


class Registration(BaseModel):
    wandb_group: str
    wandb_project: str
    batch_size: int = Field(ge=1, le=2**63 - 1)
    max_token_len: Int64
    checkpoint_dir: str
    save_checkpoint_interval: Int64
    starting_step: Int64
    num_steps: Int64


class RegisterEnv(BaseModel):
    max_token_length: Int64
    desired_name: str
    # A non-finite or negative weight would break /status-env's arithmetic for every env.
    weight: float = Field(ge=0.0, allow_inf_nan=False)
    group_size: int = Field(ge=1, le=2**63 - 1)
    min_batch_allocation: float | None = Field(None, ge=0.0, le=1.0)


class EnvIdentifier(BaseModel):
    # Atropos indexes a list with it: a negative id would name an env from the end.
    env_id: int = Field(ge=0, le=2**63 - 1)


FastRoute = Callable[[bytes, Any], Awaitable[tuple[bytes, list[tuple[bytes, bytes]]]]]

# The longest a `/status-env?wait=` long poll is held (a client asking more gets this).
MAX_STATUS_WAIT_SECONDS = 30.0


class LongPolls:
    """The status long polls of one app: `close()` (the gateway stopping) answers every
    waiting one at once, so none holds up the HTTP server's graceful shutdown."""

    def __init__(self, trajectories: DurableState) -> None:
        self._trajectories = trajectories
        self.closing = False

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True
        self._trajectories.notify()


def close_long_polls(app: Any) -> None:
    """Answer the app's waiting status long polls now (before the HTTP server stops)."""
    polls = getattr(app.state, "long_polls", None)
    if isinstance(polls, LongPolls):
        polls.close()


def add_atropos_routes(
    app: FastAPI, trajectories: DurableState, compressor: BatchCompressor
) -> dict[tuple[str, str], FastRoute]:
    """Add the trajectory API's routes to `app`; returns the handlers of the hot
    routes for the request-body middleware's fast entry, by (method, path)."""
    state = trajectories.view

    @app.get("/")
    async def root() -> dict:
        return {"message": "AtroposLib API"}

    @app.post("/register")
    async def register(registration: Registration) -> JSONResponse:
        requester = await trajectories.register_trainer(TrainerRegistration(**registration.model_dump()))
        return JSONResponse({"uuid": requester})

    @app.post("/register-env")
    async def register_env(body: RegisterEnv) -> dict:
        registered = await trajectories.register_env(EnvRegistration(**body.model_dump()))
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
            await trajectories.disconnect_env(body.env_id)
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
        batch_size, max_token_len = state.info()
        return {"batch_size": batch_size, "max_token_len": max_token_len}

    async def take_batch_json() -> bytes:
        """The next batch as /batch's JSON, once its hand-out is durable."""
        try:
            taken = await trajectories.take_batch()
        except FailedPrecondition:
            return NOT_REGISTERED
        if taken is None:
            return NO_BATCH
        log.debug("sending batch of %d sequences (step %d)", sum(g.size for g in taken), state.step)
        with handout_span(taken, state.step, "/batch"):
            return batch_json(taken)

    def prepare_next(scope: Any) -> None:
        upcoming = state.next_ready()
        if upcoming is not None and wants_gzip(scope, compressor.policy):
            # The next batch, formed already, compresses while this one travels.
            compressor.prepare(batch_json(upcoming))

    async def batch(request: Request) -> Response:
        # The full path (cross-origin callers): the gzip middleware compresses.
        body = await take_batch_json()
        prepare_next(request.scope)
        return json_bytes(body)

    async def batch_fast(_body: bytes, scope: Any) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        # What the full path answers a same-origin caller, headers included (CORS's
        # Vary: Origin, the gzip middleware's Vary and Content-Encoding).
        body = await take_batch_json()
        prepare_next(scope)
        if len(body) < compressor.minimum_size:
            return body, [VARY_ORIGIN]
        if not wants_gzip(scope, compressor.policy):
            return body, [VARY_BOTH]
        return await compressor.compressed(body), [VARY_BOTH, GZIP_ENCODING]

    @app.get("/latest_example")
    async def latest_example() -> Response:
        latest = state.latest_example()
        return json_bytes(latest if latest is not None else EMPTY_EXAMPLE_JSON)

    async def ingest_one(body: bytes, _scope: Any = None) -> tuple[bytes, list]:
        group = read_group(body, state.wants_completions, state.limits)
        (outcome,) = await trajectories.submit([group])
        if outcome.buffered:
            return orjson.dumps({"status": "buffered", "buffer_size": outcome.buffer_size}), []
        return RECEIVED, []

    async def ingest_list(body: bytes, _scope: Any = None) -> tuple[bytes, list]:
        groups = read_group_list(body, state.wants_completions, state.limits)
        outcomes = await trajectories.submit(groups)
        response: dict[str, Any] = {"status": "received", "groups_processed": len(groups)}
        buffered = [o for o in outcomes if o.buffered]
        if buffered:
            response["buffered"] = len(buffered)
            response["last_buffer_size"] = buffered[-1].buffer_size
        return orjson.dumps(response), []

    async def scored_data(request: Request) -> Response:
        return json_bytes((await ingest_one(await request.body()))[0])

    async def scored_data_list(request: Request) -> Response:
        return json_bytes((await ingest_list(await request.body()))[0])

    # Plain Starlette routes: no dependency injection or response encoding to pay for.
    app.router.add_route("/batch", batch, methods=["GET"])
    app.router.add_route("/scored_data", scored_data, methods=["POST"])
    app.router.add_route("/scored_data_list", scored_data_list, methods=["POST"])

    @app.get("/status")
    async def status() -> dict:
        return {"current_step": state.step, "queue_size": state.queue_size}

    long_polls = LongPolls(trajectories)
    app.state.long_polls = long_polls

    @app.get("/status-env")
    async def status_env(
        env: EnvIdentifier,
        wait: Annotated[float | None, Query(ge=0.0, allow_inf_nan=False)] = None,
        step: Annotated[int | None, Query()] = None,
        queue: Annotated[int | None, Query()] = None,
        version: Annotated[int | None, Query()] = None,
    ) -> dict:
        """Atropos' answer, at once. A Clotho extension (the demo env uses it; Atropos
        environments send none of these parameters and get the same JSON as ever):
        `?wait=S` answers once the trainer's step differs from `step` or this env's
        queue (`self_queue_size`) is below `queue` (the trainer took a batch) or the
        trainer's committed policy version is above `version`, or after S seconds (at
        most MAX_STATUS_WAIT_SECONDS), and adds how the trainer waits for data:
        `trainer_waiting` (batches it asked for and has not received),
        `trainer_wait_seconds` (seconds it has had such a request outstanding, in all),
        and `policy_version` (the newest committed policy the gateway knows of)."""
        if wait is None:
            s = await trajectories.env_status(env.env_id)
        else:

            def changed(now: EnvStatus) -> bool:
                return (
                    (step is not None and now.current_step != step)
                    or (queue is not None and now.self_queue_size < queue)
                    or (version is not None and state.policy_version > version)
                )

            timeout = min(wait, MAX_STATUS_WAIT_SECONDS)
            s = await trajectories.env_status_once(env.env_id, changed, timeout, long_polls.is_closing)
        answer: dict[str, Any] = {
            "current_step": s.current_step,
            "queue_size": s.queue_size,
            "unallocated_fraction": s.unallocated_fraction,
            "self_queue_size": s.self_queue_size,
            "max_group_size": s.max_group_size,
            "env_weight": s.env_weight,
        }
        if wait is not None:
            demand = trajectories.demand
            answer["trainer_waiting"] = demand.outstanding
            answer["trainer_wait_seconds"] = demand.waited_seconds()
            answer["policy_version"] = state.policy_version
        return answer

    @app.get("/reset_data")
    async def reset_data() -> PlainTextResponse:
        await trajectories.reset()
        return PlainTextResponse("Reset successful", status_code=200)

    return {
        ("POST", "/scored_data"): ingest_one,
        ("POST", "/scored_data_list"): ingest_list,
        ("GET", "/batch"): batch_fast,
    }
