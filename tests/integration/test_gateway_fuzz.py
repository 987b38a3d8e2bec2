"""Fuzzing a real gateway process: schemathesis against its served OpenAPI document
(every route but `/reset_data`, which drops everything by design, and `/batch`, which
has no input), positive and negative cases, and hypothesis-generated ScoredData over
GatewayService.SubmitScoredData. No answer is a 5xx, no gRPC status UNKNOWN or
INTERNAL, the gateway keeps serving, and the groups acknowledged before the fuzzing
still come out of `/batch` exactly once. Bounded in examples and time (well under a
minute); the inference behind the gateway is a fake in the test process."""

from __future__ import annotations

import asyncio
import math
import time

import grpc
import httpx
import pytest
import pytest_asyncio
from grpc import aio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clotho.v1 import gateway_service_pb2 as gpb
from clotho.v1 import gateway_service_pb2_grpc as gpb_grpc
from clotho.v1 import inference_service_pb2 as ipb
from clotho.v1 import inference_service_pb2_grpc as ipb_grpc
from clotho.v1 import policy_pb2
from clotho.v1 import scored_data_pb2 as spb

schemathesis = pytest.importorskip("schemathesis")
from schemathesis import GenerationMode  # noqa: E402

pytestmark = pytest.mark.asyncio(loop_scope="module")

VOCAB = 64
BATCH = 4
EARLIER = 6  # groups acknowledged before the fuzzing, each a whole batch
EXAMPLES = 8  # per operation and generation mode
SECONDS = 30  # after this only the routes that matter most are still fuzzed


class EchoInference(ipb_grpc.InferenceServiceServicer):
    """Every sample is tokens 5, 6, 7 then eos (4); n above 64 is refused as the engine
    refuses n above its max_batch_size."""

    def __init__(self, model_path: str) -> None:
        self.model_path = model_path

    async def GetModelInfo(self, request, context):
        return ipb.GetModelInfoResponse(
            model_name="tiny", model_path=self.model_path, max_context_len=512, eos_token_id=4, vocab_size=VOCAB
        )

    async def Generate(self, request, context):
        n = request.sampling_params.n if request.sampling_params.HasField("n") else 1
        if not 1 <= n <= 64:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"n must be between 1 and max_batch_size 64, got {n}")
        for i in range(n):
            yield ipb.GenerateResponse(
                index=i,
                completion=ipb.Completion(
                    output_ids=[5, 6, 7, 4],
                    output_logprobs=[-0.1] * 4,
                    finish_reason=ipb.FINISH_REASON_STOP,
                    matched_stop="4",
                    version_spans=[policy_pb2.VersionSpan(start_token=0, version=0)],
                    prompt_tokens=len(request.input_ids),
                ),
            )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway(tokenizer_dir, tmp_path_factory, service_process):
    server = aio.server()
    ipb_grpc.add_InferenceServiceServicer_to_server(EchoInference(tokenizer_dir), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    workdir = tmp_path_factory.mktemp("fuzz-gateway")
    args = ["--http-port", "0", "--grpc-port", "0", "--inference", f"127.0.0.1:{port}", "--grace-seconds", "1"]
    args += ["--data-dir", str(workdir / "store")]
    try:
        async with service_process("services.gateway", args, workdir) as (_, ready):
            yield f"http://127.0.0.1:{ready['http_port']}", f"127.0.0.1:{ready['grpc_port']}"
    finally:
        await server.stop(0)


def earlier_group(k: int) -> dict:
    tokens = [[1, 2, 3, 10 + k], [1, 2, 4, 10 + k], [1, 2, 5, 10 + k], [1, 2, 6, 10 + k]]
    return {"tokens": tokens, "masks": [[-100] + t[1:] for t in tokens], "scores": [1.0, 0.0, 0.5, 0.25]}


def http_fuzz(url: str, calls: dict[str, int], seconds: dict[str, float]) -> list[str]:
    """schemathesis over every operation; the answers that were 5xx (`calls`: how
    many requests each operation got)."""
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    failures: list[str] = []
    deadline = time.monotonic() + SECONDS
    skip = {("GET", "/reset_data"), ("GET", "/batch")}
    operations = [result.ok() for result in schema.get_all_operations()]
    # The routes that matter most first, should the time bound stop the run early.
    first = ["/scored_data", "/scored_data_list", "/generate", "/v1/completions", "/v1/chat/completions"]
    operations.sort(key=lambda op: first.index(op.path) if op.path in first else len(first))
    for operation in operations:
        if (operation.method.upper(), operation.path) in skip:
            continue
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            if time.monotonic() > deadline and operation.path not in first:
                return failures

            label = f"{operation.method.upper()} {operation.path}"

            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                derandomize=True,
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case) -> None:
                response = case.call(base_url=url, timeout=30)
                calls[label] = calls.get(label, 0) + 1  # noqa: B023 - run() is called right below
                if response.status_code >= 500:
                    failures.append(
                        f"{case.method} {case.path} -> {response.status_code}: {response.text[:200]} "
                        f"(body {case.body!r:.600})"
                    )

            began = time.monotonic()
            try:
                run()
            except Exception as exc:  # an unsatisfiable schema is not a finding
                if "Unsatisfiable" not in type(exc).__name__:
                    raise
            seconds[label] = seconds.get(label, 0.0) + time.monotonic() - began
    return failures


floats = st.floats(allow_nan=True, allow_infinity=True, width=32) | st.sampled_from([math.nan, -math.inf, 1e39])
token_ids = st.integers(-(2**31), 2**31 - 1) | st.integers(-3, VOCAB + 3)
known = ["advantages", "ref_logprobs", "inference_logprobs", "messages", "overrides", "distill_token_ids"]
sequences = st.builds(
    spb.ScoredSequence,
    tokens=st.lists(token_ids, max_size=6),
    masks=st.lists(token_ids | st.just(-100), max_size=6),
    score=st.floats(allow_nan=True, allow_infinity=True),
    advantages=st.lists(floats, max_size=7),
    inference_logprobs=st.lists(floats, max_size=7),
    ref_logprobs=st.lists(floats, max_size=7),
    present_fields=st.lists(st.sampled_from([*known, "bogus"]), max_size=3),
)
groups = st.builds(
    spb.ScoredGroup,
    sequences=st.lists(sequences, max_size=BATCH + 2),
    env_id=st.none() | st.integers(-(2**63), 2**63 - 1),
)


def grpc_fuzz(target: str) -> list[str]:
    """SubmitScoredData with generated groups; the statuses that were not a verdict."""
    failures: list[str] = []
    accepted = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.NOT_FOUND}
    with grpc.insecure_channel(target) as channel:
        stub = gpb_grpc.GatewayServiceStub(channel)

        @settings(max_examples=100, deadline=None, database=None, derandomize=True)
        @given(batch=st.lists(groups, min_size=1, max_size=3))
        def run(batch) -> None:
            try:
                stub.SubmitScoredData(iter([gpb.SubmitScoredDataRequest(group=g) for g in batch]), timeout=10)
            except grpc.RpcError as exc:
                if exc.code() not in accepted:
                    failures.append(f"{exc.code().name}: {exc.details()}")

        run()
    return failures


async def drain(http: httpx.AsyncClient) -> list[dict]:
    out: list[dict] = []
    while True:
        batch = (await http.get("/batch")).json()["batch"]
        if batch is None:
            return out
        out += batch


async def test_fuzzing_finds_no_server_error_and_loses_nothing(gateway):
    url, target = gateway
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        registration = {"wandb_group": "g", "wandb_project": "p", "batch_size": BATCH, "max_token_len": 64}
        registration |= {"checkpoint_dir": "", "save_checkpoint_interval": 1, "starting_step": 0, "num_steps": 9}
        assert (await http.post("/register", json=registration)).status_code == 200
        assert (await http.get("/batch")).json() == {"batch": None}
        for k in range(EARLIER):
            assert (await http.post("/scored_data", json=earlier_group(k))).json() == {"status": "received"}
        # The door knows the vocabulary (learned from the inference service).
        bad = earlier_group(0)
        bad["tokens"][0][3] = VOCAB
        r = await http.post("/scored_data", json=bad)
        assert r.status_code == 422 and "tokens[0][3] is 64" in r.json()["error"], r.text

        started = time.monotonic()
        calls: dict[str, int] = {}
        seconds: dict[str, float] = {}
        failures = await asyncio.to_thread(http_fuzz, url, calls, seconds)
        http_seconds = time.monotonic() - started
        failures += await asyncio.to_thread(grpc_fuzz, target)
        assert not failures, "\n".join(failures[:20])
        print(
            f"fuzzing: HTTP {sum(calls.values())} requests in {http_seconds:.1f} s, then gRPC; total "
            f"{time.monotonic() - started:.1f} s; {calls}; {seconds}"
        )
        # Every route that matters was reached with bodies.
        for label in (
            "POST /scored_data",
            "POST /scored_data_list",
            "POST /generate",
            "POST /v1/completions",
            "POST /v1/chat/completions",
        ):
            assert calls.get(label, 0) >= EXAMPLES, (label, calls)
        assert calls.get("POST /register-env", 0) or http_seconds > SECONDS, calls

        assert (await http.get("/status")).status_code == 200
        taken = await drain(http)
        for k in range(EARLIER):
            group = earlier_group(k)
            assert sum(1 for g in taken if g["tokens"] == group["tokens"]) == 1, k
        # Still serving: a new group goes in and comes out.
        assert (await http.post("/scored_data", json=earlier_group(40))).json() == {"status": "received"}
        assert [g["tokens"] for g in await drain(http)] == [earlier_group(40)["tokens"]]
