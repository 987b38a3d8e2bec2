"""clotho.v1.GatewayService over the same TrajectoryState as the Atropos REST routes.

Every call that changes the state goes through `DurableState` and answers only once
the change is durable: an acknowledged submission survives a crash of the gateway,
and a batch is deleted from the store before it is sent (at most once), unless the
trainer acknowledges batches through its checkpoints (StreamBatches with
`resume_step`): then it stays until a checkpoint holds it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import orjson
from grpc import aio

from clotho.v1 import gateway_service_pb2 as pb
from clotho.v1 import gateway_service_pb2_grpc as pb_grpc
from services.common.errors import FailedPrecondition, InvalidArgument, Unavailable
from services.common.telemetry import traceparent
from services.gateway.rpc.convert import batch_to_proto, env_names, group_from_proto, group_to_proto
from services.gateway.trajectory.durable import DurableState
from services.gateway.trajectory.records import EnvRegistration, TrainerRegistration
from services.gateway.trajectory.scored_data import admit_group
from services.gateway.trajectory.state import TrajectoryState
from services.gateway.trajectory.tracing import handout_span

log = logging.getLogger(__name__)

SERVICE_NAME = "clotho.v1.GatewayService"


class GatewayServicer(pb_grpc.GatewayServiceServicer):
    """The trajectory API for gRPC clients (trainers and non-Python environments)."""

    def __init__(self, state: TrajectoryState, inference: Any = None) -> None:
        self._trajectories = DurableState(state)
        # Acknowledging StreamBatches streams opened so far: only the newest one sends.
        self._acknowledging_streams = 0
        # The gateway's InferenceService pool (generation.pool.InferencePool), shared
        # with the HTTP /generate route; None serves no Generate.
        self._inference = inference

    async def RegisterTrainer(
        self, request: pb.RegisterTrainerRequest, context: aio.ServicerContext
    ) -> pb.RegisterTrainerResponse:
        if request.batch_size == 0:
            raise InvalidArgument("batch_size must be at least 1")
        requester = await self._trajectories.register_trainer(
            TrainerRegistration(
                wandb_group=request.wandb_group,
                wandb_project=request.wandb_project,
                batch_size=request.batch_size,
                max_token_len=request.max_token_len,
                checkpoint_dir=request.checkpoint_dir,
                save_checkpoint_interval=request.save_checkpoint_interval,
                starting_step=request.starting_step,
                num_steps=request.num_steps,
            )
        )
        return pb.RegisterTrainerResponse(uuid=str(requester))

    async def RegisterEnv(self, request: pb.RegisterEnvRequest, context: aio.ServicerContext) -> pb.RegisterEnvResponse:
        if request.group_size == 0:
            raise InvalidArgument("group_size must be at least 1")
        minimum = request.min_batch_allocation if request.HasField("min_batch_allocation") else None
        if minimum is not None and not 0.0 <= minimum <= 1.0:
            raise InvalidArgument(f"min_batch_allocation must be in [0, 1], got {minimum}")
        registered = await self._trajectories.register_env(
            EnvRegistration(
                max_token_length=request.max_token_length,
                desired_name=request.desired_name,
                weight=request.weight,
                group_size=request.group_size,
                min_batch_allocation=minimum,
            )
        )
        if registered is None:
            return pb.RegisterEnvResponse(status="wait for trainer to start")
        return pb.RegisterEnvResponse(
            status="success",
            env_id=registered.env_id,
            wandb_name=registered.wandb_name,
            checkpoint_dir=registered.checkpoint_dir,
            starting_step=registered.starting_step,
            checkpoint_interval=registered.checkpoint_interval,
            num_steps=registered.num_steps,
        )

    async def DisconnectEnv(
        self, request: pb.DisconnectEnvRequest, context: aio.ServicerContext
    ) -> pb.DisconnectEnvResponse:
        await self._trajectories.disconnect_env(request.env_id)
        return pb.DisconnectEnvResponse()

    async def GetStatus(self, request: pb.GetStatusRequest, context: aio.ServicerContext) -> pb.GetStatusResponse:
        state = self._trajectories.view
        return pb.GetStatusResponse(
            current_step=state.step,
            queue_size=state.queue_size,
            policy_version=state.policy_version,
            stale_dropped_groups=state.counters.stale_dropped_groups,
            stale_kept_groups=state.counters.stale_kept_groups,
            max_staleness=state.max_staleness,
            stored_groups=state.held_groups,
            max_stored_groups=state.max_groups,
        )

    async def GetEnvStatus(
        self, request: pb.GetEnvStatusRequest, context: aio.ServicerContext
    ) -> pb.GetEnvStatusResponse:
        s = await self._trajectories.env_status(request.env_id)
        return pb.GetEnvStatusResponse(
            current_step=s.current_step,
            queue_size=s.queue_size,
            unallocated_fraction=s.unallocated_fraction,
            self_queue_size=s.self_queue_size,
            max_group_size=s.max_group_size,
            env_weight=s.env_weight,
        )

    async def SubmitScoredData(
        self, request_iterator: AsyncIterator[pb.SubmitScoredDataRequest], context: aio.ServicerContext
    ) -> pb.SubmitScoredDataResponse:
        """All or nothing: every group is checked as it arrives and the stream's groups
        enter the queue together once the client has sent them all; the answer comes
        once they are durable (RESOURCE_EXHAUSTED when the store is full)."""
        groups: list[dict[str, Any]] = []
        async for request in request_iterator:
            where = f"groups[{len(groups)}]."
            try:
                group = group_from_proto(request.group)
            except InvalidArgument as exc:
                raise InvalidArgument(f"{where}{exc}") from None
            # The same door as /scored_data (scored_data.admit_group).
            groups.append(admit_group(group, self._trajectories.view.limits, prefix=where))
        outcomes = await self._trajectories.submit(groups)
        buffered = sum(1 for o in outcomes if o.buffered)
        return pb.SubmitScoredDataResponse(received=len(outcomes) - buffered, buffered=buffered)

    async def StreamBatches(
        self, request_iterator: AsyncIterator[pb.StreamBatchesRequest], context: aio.ServicerContext
    ) -> AsyncIterator[pb.StreamBatchesResponse]:
        """Send a batch whenever one can be formed and a credit is unspent. The first
        credit counts as the trainer starting (like the first /batch); batches come
        from the same queue and advance the same step as /batch, one step per batch
        formed (TrajectoryState.take_next). A credit message may carry the trainer's
        committed policy version.

        A stream whose first message sets `resume_step` acknowledges (acknowledged.py):
        its batches are kept until a `checkpointed_step` covers them, and it is first
        given again every kept batch after `resume_step`; a newer such stream ends it.
        Any other stream gets each batch deleted from the store before it is sent: at
        most once, as /batch."""
        trajectories = self._trajectories
        credits = 0
        closed = False
        failure: list[BaseException] = []
        requests = request_iterator.__aiter__()
        try:
            first = await requests.__anext__()
        except StopAsyncIteration:
            return
        acknowledging = first.HasField("resume_step")
        after = first.resume_step
        generation = 0
        if acknowledging:
            self._acknowledging_streams += 1
            generation = self._acknowledging_streams
            checkpointed = first.checkpointed_step if first.HasField("checkpointed_step") else 0
            await trajectories.open_acknowledged(first.resume_step, checkpointed)

        def apply(request: pb.StreamBatchesRequest) -> None:
            nonlocal credits
            if request.HasField("policy_version"):
                trajectories.note_version(request.policy_version)
            if acknowledging and request.HasField("checkpointed_step"):
                trajectories.note_checkpointed(request.checkpointed_step)
            if request.credits:
                trajectories.note_started()
                credits += request.credits
                trajectories.demand.asked(request.credits)
                trajectories.notify()

        async def read_credits() -> None:
            nonlocal closed
            try:
                async for request in requests:
                    apply(request)
            except (FailedPrecondition, Unavailable) as exc:
                failure.append(exc)
            except Exception as exc:  # noqa: BLE001 - a broken client stream just ends the credits
                log.debug("StreamBatches credit stream ended: %r", exc)
            finally:
                closed = True
                trajectories.notify()

        apply(first)
        reader = asyncio.create_task(read_credits())

        def may_take() -> bool:
            return credits > 0

        def stop() -> bool:
            superseded = acknowledging and self._acknowledging_streams != generation
            return bool(failure) or (closed and credits == 0) or superseded

        try:
            while True:
                # The predicates read the live credit count, which read_credits() raises.
                if acknowledging:
                    taken = await trajectories.next_acknowledged_batch(after, may_take, stop)
                else:
                    taken = await trajectories.next_batch(may_take=may_take, stop=stop)
                if taken is None:
                    break
                batch, step = taken
                after = step
                credits -= 1
                trajectories.demand.answered()
                with handout_span(batch, step, "StreamBatches") as span:
                    response = pb.StreamBatchesResponse(
                        groups=batch_to_proto(batch),
                        step=step,
                        traceparent=traceparent(span),
                        env_names=env_names(batch, trajectories.view.envs),
                    )
                yield response
            if failure:
                raise failure[0]
        finally:
            reader.cancel()
            trajectories.demand.answered(credits)  # withdrawn with the stream

    # -- parity with the REST side: /generate, /latest_example, /reset_data, /info -------

    async def Generate(
        self, request: pb.GatewayServiceGenerateRequest, context: aio.ServicerContext
    ) -> AsyncIterator[pb.GatewayServiceGenerateResponse]:
        """InferenceService.Generate through the same pool as `/generate`: the least
        loaded healthy target, a retry elsewhere on UNAVAILABLE before the first message,
        a version receipt per completion. The target's own status ends the call as is."""
        inference = self._inference
        if inference is None or not inference.configured:
            raise Unavailable("no inference service configured: start the gateway with --inference host:port")
        stream = inference.generate(request.request)
        try:
            async for message in stream:
                yield pb.GatewayServiceGenerateResponse(response=message)
        except aio.AioRpcError as exc:
            await context.abort(exc.code(), f"inference service: {exc.details()}")
        finally:
            await stream.aclose()

    async def GetLatestExample(
        self, request: pb.GetLatestExampleRequest, context: aio.ServicerContext
    ) -> pb.GetLatestExampleResponse:
        latest = self._trajectories.view.latest_example()
        if latest is None:
            return pb.GetLatestExampleResponse()
        return pb.GetLatestExampleResponse(group=group_to_proto(orjson.loads(latest)))

    async def ResetData(self, request: pb.ResetDataRequest, context: aio.ServicerContext) -> pb.ResetDataResponse:
        await self._trajectories.reset()
        return pb.ResetDataResponse()

    async def GetInfo(self, request: pb.GetInfoRequest, context: aio.ServicerContext) -> pb.GetInfoResponse:
        batch_size, max_token_len = self._trajectories.view.info()
        return pb.GetInfoResponse(batch_size=batch_size, max_token_len=max_token_len)
