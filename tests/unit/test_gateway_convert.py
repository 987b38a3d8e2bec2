"""Atropos group dict <-> ScoredGroup: every optional field round-trips, and absent
stays absent while empty stays empty."""

from __future__ import annotations

import copy

import pytest

from clotho.v1 import scored_data_pb2 as pb
from services.common.errors import InvalidArgument
from services.gateway.rpc.convert import batch_to_proto, group_from_proto, group_to_proto
from services.gateway.trajectory.queue_index import Group
from services.gateway.trajectory.scored_data import ATROPOS_KEYS, check_group, encode_group


def bare(tokens):
    g = dict.fromkeys(ATROPOS_KEYS)
    g.update(tokens=tokens, masks=[[-100] * len(t) for t in tokens], scores=[float(i) for i in range(len(tokens))])
    return g


def full_group():
    tokens = [[1, 2, 3], [4, 5]]
    g = bare(tokens)
    g.update(
        # float32-exact values: the per-token lists are float32 on the wire.
        advantages=[[0.5, -0.25, 1.0], [2.0, 0.0]],
        ref_logprobs=[[-1.5, -0.125, -3.0], [-0.5, -2.0]],
        inference_logprobs=[[-1.0, -0.75, -0.0625], [-4.0, -8.0]],
        messages=[
            [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "reward": 1, "extra": None}],
            [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        ],
        generation_params={"temperature": 0.7, "max_tokens": 512, "stop": ["</s>"], "echo": False},
        overrides=[{"set_advantage_to_zero": True}, {"weight": 0.5, "nested": {"k": [1, 2], "e": [], "o": {}}}],
        group_overrides={"group_weight": 2},
        images=["data:image/png;base64,AAAA", None, [], {}],
        env_id=3,
        distill_token_ids=[[[7, 8], [9, 10], [11, 12]], [[1, 2], [3, 4]]],
        distill_logprobs=[[[-0.5, -1.5], [-0.25, -2.0], [-1.0, -1.0]], [[-0.5, -0.5], [-3.0, -4.0]]],
        policy_versions=[4, None],
    )
    return g


def test_every_optional_field_round_trips():
    g = full_group()
    check_group(g)
    msg = group_to_proto(copy.deepcopy(g))
    assert msg.HasField("env_id") and msg.sequences[0].HasField("policy_version")
    assert not msg.sequences[1].HasField("policy_version")
    back = group_from_proto(msg)
    assert back == g
    assert list(back) == list(g)  # Atropos' key order, extension last
    # And proto -> dict -> proto is stable on the wire.
    assert group_to_proto(back).SerializeToString(deterministic=True) == msg.SerializeToString(deterministic=True)


def test_absent_fields_stay_absent():
    g = bare([[1, 2], [3]])
    msg = group_to_proto(g)
    assert all(not s.present_fields for s in msg.sequences)
    for name in ("generation_params", "group_overrides", "images", "env_id"):
        assert not msg.HasField(name)
    back = group_from_proto(msg)
    assert back == g
    assert "policy_versions" not in back


def test_empty_fields_stay_empty_and_falsy_values_survive():
    g = bare([[1], [2]])
    g.update(
        messages=[[], []],
        overrides=[{}, {}],
        distill_token_ids=[[], []],
        generation_params={},
        group_overrides={},
        images=[],
        env_id=0,
    )
    g["scores"] = [0.0, -0.0]
    back = group_from_proto(group_to_proto(g))
    assert back == g
    assert back["env_id"] == 0 and back["distill_logprobs"] is None


def test_per_token_lists_sent_empty_are_kept_apart_from_missing_ones():
    g = bare([[], []])
    g.update(advantages=[[], []], ref_logprobs=None, inference_logprobs=[[], []])
    back = group_from_proto(group_to_proto(g))
    assert back["advantages"] == [[], []]
    assert back["ref_logprobs"] is None
    assert back["inference_logprobs"] == [[], []]


def test_only_one_distill_side_present():
    g = bare([[1, 2]])
    g["distill_logprobs"] = [[[-0.5], [-1.0]]]
    back = group_from_proto(group_to_proto(g))
    assert back["distill_logprobs"] == [[[-0.5], [-1.0]]]
    assert back["distill_token_ids"] is None


def test_proto_clients_that_skip_present_fields_still_get_their_lists():
    msg = pb.ScoredGroup(
        sequences=[pb.ScoredSequence(tokens=[1, 2], masks=[-100, 2], score=1.0, advantages=[0.5, 0.5])]
    )
    back = group_from_proto(msg)
    assert back["advantages"] == [[0.5, 0.5]]
    assert back["ref_logprobs"] is None


def test_unknown_present_field_is_rejected_with_its_name():
    msg = pb.ScoredGroup(sequences=[pb.ScoredSequence(tokens=[1], masks=[1], present_fields=["advantage"])])
    with pytest.raises(InvalidArgument, match="advantage"):
        group_from_proto(msg)


def test_held_groups_go_out_with_their_attributed_versions():
    """StreamBatches sends what the store holds (the stored JSON) with every sequence's
    version, whether the client sent it or the gateway attributed it."""
    g = full_group()  # the client sent version 4 for the first sequence only
    held = Group(id=1, size=2, env_id=3, body=encode_group(g), versions=(4, 7), qpos=0)
    (msg,) = batch_to_proto([held])
    assert [s.policy_version for s in msg.sequences] == [4, 7]
    back = group_from_proto(msg)
    assert back.pop("policy_versions") == [4, 7]
    assert back == {k: v for k, v in g.items() if k != "policy_versions"}
