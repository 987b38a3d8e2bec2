"""Thread budgets: `clotho up` divides the cores; each service applies its setting."""

import os
import subprocess
import sys

import pytest

from services.common.settings import THREAD_ENV_VARS, ServiceSettings, load_settings
from services.up import thread_budget, thread_env


@pytest.mark.parametrize("cores", [1, 2, 3, 4, 5, 6, 8, 16, 64])
def test_budget_gives_every_process_a_thread_and_the_heavy_ones_the_rest(cores) -> None:
    b = thread_budget(cores)
    assert set(b) == {"inference", "trainer", "gateway", "env"}
    assert all(n >= 1 for n in b.values())
    assert b["gateway"] == b["env"] == 1
    # The trainer and inference split what is left without going over the machine.
    heavy = b["trainer"] + b["inference"]
    assert heavy == max(cores if cores < 6 else cores - 2, 2)
    assert abs(b["trainer"] - b["inference"]) <= 1
    if cores >= 6:
        assert sum(b.values()) == cores


def test_budget_on_this_issues_machine() -> None:
    assert thread_budget(2) == {"inference": 1, "trainer": 1, "gateway": 1, "env": 1}
    with pytest.raises(ValueError):
        thread_budget(0)


def test_thread_env_names_every_pool() -> None:
    assert thread_env(3) == dict.fromkeys(THREAD_ENV_VARS, "3")
    assert "OMP_NUM_THREADS" in THREAD_ENV_VARS


def test_every_service_settings_has_a_threads_field() -> None:
    from services.gateway.settings import GatewaySettings
    from services.inference.settings import InferenceSettings
    from services.trainer.settings import TrainerSettings

    for cls in (GatewaySettings, InferenceSettings, TrainerSettings):
        assert issubclass(cls, ServiceSettings)
        assert cls.model_fields["threads"].default == 0


def test_loading_settings_applies_the_budget_in_a_fresh_process() -> None:
    code = (
        "import os, torch\n"
        "from services.trainer.settings import TrainerSettings\n"
        "from services.common.settings import load_settings\n"
        "load_settings(TrainerSettings, ['--threads', '1'])\n"
        "print(torch.get_num_threads(), torch.get_num_interop_threads(), os.environ['OMP_NUM_THREADS'],"
        " os.environ['RAYON_NUM_THREADS'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in THREAD_ENV_VARS}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["1", "1", "1", "1"]


def test_zero_threads_changes_nothing(monkeypatch) -> None:
    from services.trainer.settings import TrainerSettings

    for name in THREAD_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    settings = load_settings(TrainerSettings, [])
    assert settings.threads == 0
    assert not any(name in os.environ for name in THREAD_ENV_VARS)


def test_plan_on_few_cores_shares_them_with_inference_at_lower_priority() -> None:
    from services.up import INFERENCE_NICE, thread_plan

    threads, nice = thread_plan(2)
    assert threads == {"inference": 2, "trainer": 2, "gateway": 1, "env": 1}
    assert nice == {"inference": INFERENCE_NICE} and INFERENCE_NICE > 0
    assert thread_plan(2, "share") == (threads, nice)
    assert thread_plan(1, "share")[0]["trainer"] == 1


def test_plan_split_is_the_budget_and_auto_splits_many_cores() -> None:
    from services.up import thread_plan

    for cores in (1, 2, 4, 8, 16):
        assert thread_plan(cores, "split") == (thread_budget(cores), {})
    assert thread_plan(16) == (thread_budget(16), {})
    with pytest.raises(ValueError):
        thread_plan(2, "spread")
    with pytest.raises(ValueError):
        thread_plan(0, "share")


def test_loading_settings_applies_nice_in_a_fresh_process() -> None:
    code = (
        "import os\n"
        "from services.inference.settings import InferenceSettings\n"
        "from services.common.settings import load_settings\n"
        "before = os.nice(0)\n"
        "load_settings(InferenceSettings, ['--nice', '3', '--model-path', 'x'])\n"
        "print(os.nice(0) - before)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split()[-1] == "3"
