"""compose.yaml, its profiles and the Dockerfiles, checked by the tools that judge them.

A real Compose v2 implementation (`config -q`) validates each profile, the compose-spec
schema validates the file, and hadolint lints both Dockerfiles.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from compose_tools import compose_binary, venv_tool

ROOT = Path(__file__).resolve().parents[2]
PROFILES = {
    "cpu": {"service-token", "model", "inference", "gateway", "trainer", "env"},
    "gpu": {"service-token", "model", "inference-gpu", "gateway", "trainer-gpu", "env"},
}
OBSERVABILITY = {"otel-collector", "jaeger", "prometheus"}


def compose(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(compose_binary()), *args], cwd=ROOT, capture_output=True, text=True, check=False, timeout=60
    )


@pytest.mark.parametrize("profile", [None, "cpu", "gpu"])
def test_compose_config_validates_every_profile(profile):
    flags = [] if profile is None else ["--profile", profile]
    checked = compose(*flags, "config", "-q")
    assert checked.returncode == 0, checked.stderr
    services = set(compose(*flags, "config", "--services").stdout.split())
    # No --profile: the .env's cpu profile.
    assert services == PROFILES[profile or "cpu"] | OBSERVABILITY


def test_compose_file_matches_the_compose_spec_schema():
    proc = subprocess.run(
        [venv_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", "compose.yaml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_only_the_gateway_and_the_uis_are_published_and_gpus_are_reserved():
    config = json.loads(compose("--profile", "cpu", "--profile", "gpu", "config", "--format", "json").stdout)
    published = {name for name, svc in config["services"].items() if svc.get("ports")}
    assert published == {"gateway", "jaeger", "prometheus"}
    for name in ("inference-gpu", "trainer-gpu"):
        devices = config["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]
    for name, svc in config["services"].items():
        # The service token reaches only the services that serve or call the guarded RPCs.
        mounts = {v.get("source") for v in svc.get("volumes", [])}
        uses_token = name in {"service-token", "inference", "inference-gpu", "gateway", "trainer", "trainer-gpu"}
        assert ("service-token" in mounts) == uses_token, name
        # Configuration of our services only through CLOTHO_* and OTEL_* variables.
        if "build" in svc:
            assert all(k.startswith(("CLOTHO_", "OTEL_")) for k in svc.get("environment") or {}), name


@pytest.mark.parametrize("dockerfile", ["docker/Dockerfile.cpu", "docker/Dockerfile.gpu"])
def test_dockerfiles_pass_hadolint(dockerfile):
    proc = subprocess.run([venv_tool("hadolint"), dockerfile], cwd=ROOT, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
