"""A small step runs on one intra-op thread (TrainerSettings.single_thread_work); a large
one, or with the setting at 0, on the process's threads. The threads are put back."""

from __future__ import annotations

import pytest
import torch
from trainer_groups import groups

from services.trainer.core import TrainerCore, step_threads
from services.trainer.settings import TrainerSettings


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def threads_seen(core: TrainerCore) -> tuple[list[int], list[int]]:
    """One step; the intra-op threads its forward passes and its optimizer step ran on."""
    forward: list[int] = []
    optimizer: list[int] = []
    assert core.model is not None and core.optimizer is not None
    core.model.register_forward_hook(lambda *_: forward.append(torch.get_num_threads()))
    core.optimizer.register_step_pre_hook(lambda *_: optimizer.append(torch.get_num_threads()))
    core.train(groups(), 0)
    return forward, optimizer


@pytest.mark.parametrize(
    ("limit", "expected"),
    [(4e9, 1), (0.0, 2), (1.0, 2)],
    ids=["below the limit: one thread", "0: never", "above the limit: the process's threads"],
)
def test_step_threads_follow_the_steps_work(tiny_model_dir, two_threads, limit, expected):
    core = TrainerCore(TrainerSettings(model_path=str(tiny_model_dir), checkpoint_dir="", single_thread_work=limit))
    core.load()
    assert core.parameters == sum(p.numel() for p in core.inner.parameters())
    forward, optimizer = threads_seen(core)
    assert forward and set(forward) == {expected}
    assert optimizer == [expected]
    assert torch.get_num_threads() == 2  # put back after the step
    assert core.step == 1


def test_step_threads_restores_on_error(two_threads):
    with pytest.raises(RuntimeError), step_threads(1):
        assert torch.get_num_threads() == 1
        raise RuntimeError("boom")
    assert torch.get_num_threads() == 2
    with step_threads(None):
        assert torch.get_num_threads() == 2
