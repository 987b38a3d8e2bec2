"""The torch engine's thread policy: a forward pass whose work (parameters x tokens) is
below single_thread_work runs on one intra-op thread of the calling thread's pool; a
larger one on the pool's own size; 0 never changes it."""

from __future__ import annotations

import threading

import torch

from services.inference.torch_engine.runner import ModelRunner


def threads_during_passes(runner: ModelRunner, pool: int) -> list[int]:
    """Pool sizes seen right after a prefill and a decode, in a fresh thread whose pool
    has `pool` threads (as the engine's worker inherits the process's)."""
    seen: list[int] = []

    def work() -> None:
        torch.set_num_threads(pool)
        cache = runner.new_cache(4)
        with torch.inference_mode():
            runner.prefill(cache, [[1, 20, 21], [1, 9]], [0, 1], [0, 1], all_logits=False)
            seen.append(torch.get_num_threads())
            runner.decode(cache, torch.tensor([5, 6]))
            seen.append(torch.get_num_threads())

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    return seen


def test_small_passes_run_on_one_thread(tiny_model_dir):
    runner = ModelRunner(tiny_model_dir, "cpu", "float32", single_thread_work=1e12)
    assert threads_during_passes(runner, 2) == [1, 1]


def test_passes_above_the_bound_keep_the_pool(tiny_model_dir):
    runner = ModelRunner(tiny_model_dir, "cpu", "float32", single_thread_work=1e12)
    # Between the decode (2 tokens) and the prefill (6 tokens): the prefill uses the pool.
    runner.single_thread_work = runner.parameters * 4
    assert threads_during_passes(runner, 2) == [2, 1]


def test_zero_leaves_the_pool_alone(tiny_model_dir):
    runner = ModelRunner(tiny_model_dir, "cpu", "float32", single_thread_work=0)
    assert threads_during_passes(runner, 2) == [2, 2]
