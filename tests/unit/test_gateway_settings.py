"""GatewaySettings from flags and CLOTHO_GATEWAY_* variables."""

from __future__ import annotations

from services.common.settings import load_settings
from services.gateway.settings import GatewaySettings


def test_defaults_work_locally(monkeypatch):
    for name in ("INFERENCE", "DATA_DIR"):
        monkeypatch.delenv(f"CLOTHO_GATEWAY_{name}", raising=False)
    s = load_settings(GatewaySettings, [])
    assert (s.http_bind, s.grpc_bind_host, s.inference, s.tokenizer_path) == (
        ("127.0.0.1", 8000),
        "127.0.0.1",
        [],
        None,
    )
    assert s.max_body_bytes > 0 and s.generate_timeout_seconds > 0
    # Durable by default, bounded, staleness off.
    assert (s.store, s.data_dir, s.store_fsync) == ("sqlite", ".clotho/gateway", False)
    assert s.max_stored_groups > 0 and s.retry_after_seconds >= 1
    assert (s.max_staleness, s.staleness_policy) == (0, "drop")


def test_host_and_port_bind_http_like_run_api():
    """`clotho gateway --host H --port P` listens where `run-api --host H --port P` would;
    gRPC follows --host unless told otherwise."""
    s = load_settings(GatewaySettings, ["--host", "0.0.0.0", "--port", "8123"])
    assert (s.http_bind, s.grpc_bind_host) == (("0.0.0.0", 8123), "0.0.0.0")
    s = load_settings(GatewaySettings, ["--host", "0.0.0.0", "--grpc-host", "127.0.0.1", "--http-port", "0"])
    assert (s.http_bind, s.grpc_bind_host) == (("0.0.0.0", 0), "127.0.0.1")
    # --port wins over --http-port; --http-host over --host for HTTP only.
    s = load_settings(GatewaySettings, ["--http-port", "9", "--port", "10", "--http-host", "::1"])
    assert (s.http_bind, s.grpc_bind_host) == (("::1", 10), "127.0.0.1")


def test_flags_and_env(monkeypatch):
    monkeypatch.setenv("CLOTHO_GATEWAY_INFERENCE", "a:1, b:2")
    monkeypatch.setenv("CLOTHO_GATEWAY_TOKENIZER_PATH", "/models/tiny")
    monkeypatch.setenv("CLOTHO_GATEWAY_PORT", "8111")
    monkeypatch.setenv("CLOTHO_GATEWAY_STALENESS_POLICY", "keep")
    s = load_settings(GatewaySettings, ["--grpc-port", "0", "--max-staleness", "2", "--store", "memory"])
    assert (s.http_bind[1], s.grpc_port, s.inference, s.tokenizer_path) == (8111, 0, ["a:1", "b:2"], "/models/tiny")
    assert (s.max_staleness, s.staleness_policy, s.store) == (2, "keep", "memory")
    s = load_settings(GatewaySettings, ["--inference", "c:3", "--inference", "d:4"])
    assert s.inference == ["c:3", "d:4"]
    monkeypatch.setenv("CLOTHO_GATEWAY_INFERENCE", '["e:5"]')
    assert load_settings(GatewaySettings, []).inference == ["e:5"]
