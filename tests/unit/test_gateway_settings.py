"""GatewaySettings from flags and CLOTHO_GATEWAY_* variables."""

from __future__ import annotations

from services.common.settings import load_settings
from services.gateway.settings import GatewaySettings


def test_defaults_work_locally(monkeypatch):
    monkeypatch.delenv("CLOTHO_GATEWAY_INFERENCE", raising=False)
    s = load_settings(GatewaySettings, [])
    assert (s.http_host, s.http_port, s.inference, s.tokenizer_path) == ("127.0.0.1", 8000, [], None)
    assert s.max_body_bytes > 0 and s.generate_timeout_seconds > 0


def test_flags_and_env(monkeypatch):
    monkeypatch.setenv("CLOTHO_GATEWAY_INFERENCE", "a:1, b:2")
    monkeypatch.setenv("CLOTHO_GATEWAY_TOKENIZER_PATH", "/models/tiny")
    s = load_settings(GatewaySettings, ["--http-port", "0", "--grpc-port", "0"])
    assert (s.http_port, s.grpc_port, s.inference, s.tokenizer_path) == (0, 0, ["a:1", "b:2"], "/models/tiny")
    s = load_settings(GatewaySettings, ["--inference", "c:3", "--inference", "d:4"])
    assert s.inference == ["c:3", "d:4"]
    monkeypatch.setenv("CLOTHO_GATEWAY_INFERENCE", '["e:5"]')
    assert load_settings(GatewaySettings, []).inference == ["e:5"]
