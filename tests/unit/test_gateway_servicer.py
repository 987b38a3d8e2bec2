"""GatewayServicer called directly: registration rules, env status, errors, and
all-or-nothing submission."""

from __future__ import annotations

from typing import Any

import pytest

from clotho.v1 import gateway_service_pb2 as gpb
from clotho.v1 import scored_data_pb2 as spb
from services.common.errors import InvalidArgument, NotFound
from services.gateway.rpc.servicer import GatewayServicer
from services.gateway.trajectory import TrajectoryState

# The servicer reads nothing from the gRPC context in these calls.
NO_CONTEXT: Any = None


async def submit(servicer, groups):
    async def requests():
        for g in groups:
            yield gpb.SubmitScoredDataRequest(group=g)

    return await servicer.SubmitScoredData(requests(), None)


def seq(*tokens):
    return spb.ScoredSequence(tokens=tokens, masks=tokens, score=1.0)


async def test_registration_status_and_errors():
    state = TrajectoryState()
    servicer = GatewayServicer(state)
    env = gpb.RegisterEnvRequest(max_token_length=100, desired_name="e", weight=1.0, group_size=2)
    with pytest.raises(InvalidArgument):
        await servicer.RegisterTrainer(gpb.RegisterTrainerRequest(batch_size=0), NO_CONTEXT)
    reply = await servicer.RegisterTrainer(
        gpb.RegisterTrainerRequest(batch_size=2, checkpoint_dir="/c", num_steps=9), NO_CONTEXT
    )
    assert int(reply.uuid) > 0
    assert (await servicer.RegisterEnv(env, NO_CONTEXT)).status == "wait for trainer to start"
    state.take_batch()
    registered = await servicer.RegisterEnv(env, NO_CONTEXT)
    assert (
        registered.status,
        registered.env_id,
        registered.wandb_name,
        registered.checkpoint_dir,
        registered.num_steps,
    ) == ("success", 0, "e_0", "/c", 9)
    with pytest.raises(InvalidArgument, match="min_batch_allocation"):
        await servicer.RegisterEnv(gpb.RegisterEnvRequest(group_size=1, min_batch_allocation=1.5), NO_CONTEXT)

    result = await submit(
        servicer, [spb.ScoredGroup(sequences=[seq(1)], env_id=0), spb.ScoredGroup(sequences=[seq(2), seq(3)], env_id=0)]
    )
    assert (result.received, result.buffered) == (1, 1)
    status = await servicer.GetEnvStatus(gpb.GetEnvStatusRequest(env_id=0), NO_CONTEXT)
    assert (status.queue_size, status.self_queue_size, status.max_group_size, status.env_weight) == (1, 1, 2, 1.0)
    with pytest.raises(NotFound):
        await servicer.GetEnvStatus(gpb.GetEnvStatusRequest(env_id=4), NO_CONTEXT)
    with pytest.raises(NotFound):
        await servicer.DisconnectEnv(gpb.DisconnectEnvRequest(env_id=4), NO_CONTEXT)
    await servicer.DisconnectEnv(gpb.DisconnectEnvRequest(env_id=0), NO_CONTEXT)
    assert not state.envs[0].connected


async def test_a_bad_group_rejects_the_whole_stream():
    state = TrajectoryState()
    servicer = GatewayServicer(state)
    bad = spb.ScoredGroup(sequences=[spb.ScoredSequence(tokens=[1, 2], masks=[1], advantages=[0.5, 0.5, 0.5])])
    with pytest.raises(InvalidArgument) as info:
        await submit(servicer, [spb.ScoredGroup(sequences=[seq(1)]), bad])
    assert "groups[1].masks[0] has 1 entries but tokens[0] has 2" in str(info.value)
    assert "groups[1].advantages[0] has 3 entries" in str(info.value)
    assert state.queue_size == 0
