"""A small scored group for trainer unit tests: one prompt, two completions of different
lengths, one rewarded."""

from __future__ import annotations

from clotho.v1 import scored_data_pb2 as sd


def groups() -> list[sd.ScoredGroup]:
    prompt = [1, 10, 11, 12]
    return [
        sd.ScoredGroup(
            sequences=[
                sd.ScoredSequence(tokens=prompt + c, masks=[-100] * 4 + c, score=s)
                for c, s in (([20, 21, 22], 1.0), ([30, 31], 0.0))
            ]
        )
    ]
