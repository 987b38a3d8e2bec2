"""The demo environment keeps going through 503s (an inference restart) against a real
local HTTP server, and gives up only on errors retrying cannot fix."""

from __future__ import annotations

import asyncio
import json
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import httpx
import pytest

from services.demo import retry
from services.demo.env import DemoEnv, DemoEnvConfig


class FlakyGateway(BaseHTTPRequestHandler):
    """A gateway that answers each path's first `failures[path]` calls with 503."""

    failures: ClassVar[dict[str, int]] = {}
    seen: ClassVar[list[tuple[str, int]]] = []
    lock = threading.Lock()

    def log_message(self, *args: object) -> None:
        pass

    def _answer(self, status: int, body: object, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = json.loads(self.rfile.read(length) or b"{}")
        path = self.path
        with self.lock:
            left = self.failures.get(path, 0)
            if left:
                self.failures[path] = left - 1
            status = 503 if left else 200
            self.seen.append((path, status))
        if status == 503:
            self._answer(503, {"error": "no healthy inference service", "code": "UNAVAILABLE"}, {"Retry-After": "0"})
        elif path == "/register-env":
            self._answer(200, {"status": "success", "env_id": 0, "wandb_name": "x"})
        elif path == "/status-env":
            self._answer(200, {"self_queue_size": 0})
        elif path == "/generate":
            n = body["sampling_params"]["n"]
            out = {"meta_info": {"output_token_logprobs": [[-0.5, 5, None], [-0.5, 5, None]]}}
            self._answer(200, [out] * n)
        elif path == "/scored_data":
            self._answer(200, {"status": "received"})
        else:
            self._answer(404, {"error": "no such route"})

    do_GET = do_POST = _handle


@pytest.fixture
def gateway():
    FlakyGateway.failures = {"/register-env": 1, "/generate": 3, "/scored_data": 1}
    FlakyGateway.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FlakyGateway)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


async def test_demo_env_keeps_going_after_503s(gateway, tokenizer_dir):
    config = DemoEnvConfig(gateway_url=gateway, tokenizer_path=tokenizer_dir, group_size=2, concurrency=1, max_groups=3)
    env = DemoEnv(config)
    await asyncio.wait_for(env.run(), timeout=60)
    assert env.sent == 3
    generate = [status for path, status in FlakyGateway.seen if path == "/generate"]
    assert generate[:3] == [503, 503, 503] and generate[3:] == [200, 200, 200]
    assert ("/register-env", 503) in FlakyGateway.seen and ("/scored_data", 503) in FlakyGateway.seen


async def test_retry_returns_other_errors_and_stops_when_told(gateway):
    FlakyGateway.failures = {"/generate": 1000}
    async with httpx.AsyncClient(base_url=gateway) as client:
        # A 4xx is the caller's problem: returned at once, not retried.
        assert (await retry.request(client, "GET", "/nowhere")).status_code == 404
        stop = asyncio.Event()
        call = asyncio.create_task(retry.request(client, "POST", "/generate", json={}, stop=stop))
        while sum(1 for path, _ in FlakyGateway.seen if path == "/generate") < 3:
            await asyncio.sleep(0.01)
        stop.set()
        with pytest.raises(retry.Stopped):
            await asyncio.wait_for(call, timeout=10)


def test_backoff_grows_to_its_cap_and_honours_retry_after():
    backoff = retry.Backoff(base_seconds=0.1, max_seconds=2.0, rng=random.Random(0))
    assert all(0 <= backoff.delay(0) <= 0.1 for _ in range(50))
    assert all(0 <= backoff.delay(20) <= 2.0 for _ in range(50))
    assert backoff.delay(0, retry_after=1.5) >= 1.5
    assert backoff.delay(0, retry_after=60) <= 2.0
