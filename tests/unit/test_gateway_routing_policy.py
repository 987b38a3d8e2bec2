"""Router: least-loaded choice with round-robin ties, health from the watch stream,
failure ejection with a cool-down, and the 503 message when nothing is healthy; the
InferenceClient on top of it: failover before the first message, load released on
every path, version receipts recorded."""

from __future__ import annotations

from unittest import mock

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2

from clotho.v1 import inference_service_pb2 as ipb
from clotho.v1 import policy_pb2
from services.common.errors import Unavailable
from services.gateway.generation import pool as client_module
from services.gateway.generation.pool import InferencePool as InferenceClient
from services.gateway.generation.routing import Router

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def router(n: int = 3, clock: Clock | None = None) -> Router:
    return Router(
        [f"t{i}:1" for i in range(n)],
        eject_seconds=5.0,
        watch_health=False,
        channel_factory=lambda _address: mock.MagicMock(),
        clock=clock or Clock(),
    )


def test_least_loaded_target_wins():
    r = router()
    held = [r.acquire() for _ in range(3)]
    assert sorted(t.address for t in held) == ["t0:1", "t1:1", "t2:1"]
    assert [t.in_flight for t in r.targets] == [1, 1, 1]
    r.release(held[1])
    # t1 now has the fewest calls in flight, whatever the round-robin turn says.
    for _ in range(3):
        chosen = r.acquire()
        assert chosen is held[1]
        r.release(chosen)
    second = r.acquire()
    assert second is held[1] and second.in_flight == 1


def test_ties_go_round_robin():
    r = router()
    order = []
    for _ in range(6):
        t = r.acquire()
        order.append(t.address)
        r.release(t)
    assert order == ["t0:1", "t1:1", "t2:1"] * 2


def test_failure_ejects_for_the_cool_down_then_the_target_is_tried_again():
    clock = Clock()
    r = router(2, clock)
    t0, t1 = r.targets
    r.failed(t0, "connection refused")
    for _ in range(3):
        t = r.acquire()
        assert t is t1
        r.release(t)
    clock.now += 5.0
    assert {r.acquire().address, r.acquire().address} == {"t0:1", "t1:1"}


def test_health_status_decides_and_a_return_to_serving_ends_an_ejection():
    r = router(2)
    t0, t1 = r.targets
    r._on_status(t0, NOT_SERVING)
    assert not t0.healthy(r._clock()) and r.acquire(exclude=[]) is t1
    r._on_status(t1, SERVING)
    r.failed(t1, "boom")
    with pytest.raises(Unavailable):
        r.acquire()
    # SERVING repeated (a Check poll) does not undo an ejection the health service
    # did not see...
    r._on_status(t1, SERVING)
    assert not t1.healthy(r._clock())
    # ...but health lost and regained (a restart) does.
    r._set(t1, False, "unreachable: connection refused")
    r._on_status(t1, SERVING)
    r._on_status(t0, SERVING)
    assert t0.healthy(r._clock()) and t1.healthy(r._clock())


def test_exclude_skips_targets_already_tried():
    r = router(2)
    first = r.acquire()
    second = r.acquire(exclude=[first])
    assert second is not first
    with pytest.raises(Unavailable):
        r.acquire(exclude=[first, second])


def test_nothing_healthy_names_every_target_and_why():
    clock = Clock()
    r = router(2, clock)
    t0, t1 = r.targets
    r._set(t0, False, "unreachable: connection refused")
    r.failed(t1, "socket closed")
    with pytest.raises(Unavailable) as err:
        r.acquire()
    message = str(err.value)
    assert message.startswith("no healthy inference service")
    assert "t0:1 (unreachable: connection refused)" in message
    assert "t1:1 (ejected for 5.0s more after: socket closed)" in message
    assert [s["healthy"] for s in r.status()] == [False, False]
    assert r.status()[1]["reason"] == "socket closed"


def test_unknown_health_counts_as_healthy():
    r = router(1)
    (t0,) = r.targets
    assert t0.serving is None and t0.healthy(r._clock())
    r._on_status(t0, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
    assert r.acquire() is t0


# ---- InferenceClient over the router: failover, load accounting, receipts ----------


class FakeCall:
    """What a Generate call looks like to the client: async-iterable, cancellable."""

    def __init__(self, messages, error=None):
        self.messages, self.error, self.cancelled = messages, error, False

    def __aiter__(self):
        return self._iterate()

    async def _iterate(self):
        for m in self.messages:
            yield m
        if self.error is not None:
            raise self.error

    def cancel(self):
        self.cancelled = True


class FakeStub:
    def __init__(self, messages=(), error=None):
        self.messages, self.error, self.calls = list(messages), error, []

    def Generate(self, request, timeout=None):
        call = FakeCall(self.messages, self.error)
        self.calls.append(call)
        return call


def rpc_error(code: grpc.StatusCode) -> aio.AioRpcError:
    return aio.AioRpcError(code, aio.Metadata(), aio.Metadata(), details=f"{code.name.lower()} for the test")


def completion(ids, version):
    return ipb.GenerateResponse(
        completion=ipb.Completion(
            output_ids=ids,
            version_spans=[
                policy_pb2.VersionSpan(start_token=0, version=version),
                policy_pb2.VersionSpan(start_token=1, version=version + 1),
            ],
        )
    )


@pytest.fixture
def recorded(monkeypatch):
    seen = []

    class Recorder:
        @staticmethod
        def record(ids, version):
            seen.append((ids, version))

    monkeypatch.setattr(client_module, "_receipts", Recorder)
    return seen


def client_with(stubs, clock=None) -> InferenceClient:
    r = router(len(stubs), clock)
    r._start()
    for target, stub in zip(r.targets, stubs):
        target.stub = stub
    return InferenceClient([t.address for t in r.targets], router=r)


async def test_unavailable_before_any_message_fails_over_and_ejects(recorded):
    dead, alive = FakeStub(error=rpc_error(grpc.StatusCode.UNAVAILABLE)), FakeStub([completion([7, 8], 3)])
    client = client_with([dead, alive])
    (result,) = await client.collect(ipb.GenerateRequest(input_ids=[1]))
    assert list(result.output_ids) == [7, 8]
    assert len(dead.calls) == 1 and len(alive.calls) == 1
    t0, t1 = client.router.targets
    assert not t0.healthy(client.router._clock()) and "unavailable for the test" in t0.eject_reason
    assert (t0.in_flight, t1.in_flight) == (0, 0)
    # Receipts get the completion's oldest version.
    assert recorded == [([7, 8], 3)]
    assert all(call.cancelled for call in dead.calls + alive.calls)


async def test_a_failure_after_output_is_raised_not_retried(recorded):
    half = FakeStub(
        [ipb.GenerateResponse(chunk=ipb.TokenChunk(token_ids=[5]))], error=rpc_error(grpc.StatusCode.UNAVAILABLE)
    )
    other = FakeStub([completion([1], 0)])
    client = client_with([half, other])
    with pytest.raises(aio.AioRpcError):
        await client.collect(ipb.GenerateRequest(input_ids=[1]))
    assert other.calls == [] and [t.in_flight for t in client.router.targets] == [0, 0]


async def test_other_errors_pass_through_without_ejection(recorded):
    bad = FakeStub(error=rpc_error(grpc.StatusCode.INVALID_ARGUMENT))
    client = client_with([bad, FakeStub()])
    with pytest.raises(aio.AioRpcError) as err:
        await client.collect(ipb.GenerateRequest(input_ids=[1]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert all(t.healthy(client.router._clock()) for t in client.router.targets)


async def test_every_target_down_is_unavailable(recorded):
    client = client_with([FakeStub(error=rpc_error(grpc.StatusCode.UNAVAILABLE)) for _ in range(2)])
    with pytest.raises(aio.AioRpcError):
        await client.collect(ipb.GenerateRequest(input_ids=[1]))
    with pytest.raises(Unavailable, match="no healthy inference service"):
        await client.collect(ipb.GenerateRequest(input_ids=[1]))
