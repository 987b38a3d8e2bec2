"""Access to the policy: the service token on InferenceService (a real process) and
TrainerService (a real server), health left open, the refusal to listen beyond loopback
without a token, the rendezvous store on the configured address, TLS and mTLS, and
answers that name no local path or internal exception class."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clotho.v1 import inference_service_pb2 as inf
from clotho.v1 import inference_service_pb2_grpc as inf_grpc
from clotho.v1 import trainer_service_pb2 as tr
from clotho.v1 import trainer_service_pb2_grpc as tr_grpc
from services.common.access import ExposureRefused
from services.common.method_handlers import INTERNAL_MESSAGE
from services.common.server import build_server, channel
from services.common.settings import load_settings
from services.common.weight_wire import CollectiveGroup
from services.trainer.server import create_server as create_trainer_server
from services.trainer.settings import TrainerSettings

REPO = Path(__file__).resolve().parents[2]
TOKEN = "s3rvice-" + uuid.uuid4().hex


async def _code(call) -> grpc.StatusCode:
    """The status a call (unary awaitable or stream) ends with; OK when it succeeds."""
    try:
        if hasattr(call, "read") and not hasattr(call, "__await__"):
            async for _ in call:
                pass
        else:
            result = await call
            if hasattr(result, "__aiter__"):
                async for _ in result:
                    pass
    except aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def _health(target: str) -> int:
    async with aio.insecure_channel(target) as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        return reply.status


# ---- InferenceService, a real process -------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def inference_target(tiny_model_dir, tmp_path_factory, service_process):
    # The token reaches the process through its environment only.
    env = {"CLOTHO_INFERENCE_SERVICE_TOKEN": TOKEN}
    args = ["--model-path", str(tiny_model_dir), "--grpc-port", "0"]
    async with service_process("services.inference", args, tmp_path_factory.mktemp("inf-logs"), env=env) as (
        child,
        ready,
    ):
        assert TOKEN not in " ".join(args)
        yield f"127.0.0.1:{ready['grpc_port']}"


def _inference_calls(stub: inf_grpc.InferenceServiceStub) -> dict[str, object]:
    return {
        "Prepare": stub.PrepareWeightUpdate(inf.PrepareWeightUpdateRequest(version=1), timeout=10),
        "Await": stub.AwaitWeightTransfer(inf.AwaitWeightTransferRequest(version=1), timeout=10),
        "Commit": stub.CommitWeightUpdate(inf.CommitWeightUpdateRequest(version=1), timeout=10),
        "Abort": stub.AbortWeightUpdate(inf.AbortWeightUpdateRequest(version=1), timeout=10),
        "GetModelInfo": stub.GetModelInfo(inf.GetModelInfoRequest(), timeout=10),
        "GetServedPolicy": stub.GetServedPolicy(inf.GetServedPolicyRequest(), timeout=10),
        "Generate": stub.Generate(
            inf.GenerateRequest(input_ids=[1, 2, 3], sampling_params=inf.SamplingParams(max_new_tokens=1)), timeout=30
        ),
    }


@pytest.mark.asyncio(loop_scope="module")
async def test_inference_refuses_calls_without_the_token(inference_target, tiny_model_dir) -> None:
    for token in (None, "wrong-" + TOKEN):
        ch = channel(inference_target, token=token)
        try:
            calls = _inference_calls(inf_grpc.InferenceServiceStub(ch))
            codes = {name: await _code(call) for name, call in calls.items()}
        finally:
            await ch.close()
        assert codes == dict.fromkeys(codes, grpc.StatusCode.UNAUTHENTICATED), (token, codes)
    # Probes stay open.
    assert await _health(inference_target) == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.asyncio(loop_scope="module")
async def test_inference_serves_with_the_token_and_hands_out_no_path(inference_target, tiny_model_dir) -> None:
    ch = channel(inference_target, token=TOKEN)
    try:
        stub = inf_grpc.InferenceServiceStub(ch)
        info = await stub.GetModelInfo(inf.GetModelInfoRequest(), timeout=10)
        assert info.model_name == Path(tiny_model_dir).name
        assert info.model_path == info.model_name and "/" not in info.model_path
        assert str(tiny_model_dir) not in str(info)
        policy = await stub.GetServedPolicy(inf.GetServedPolicyRequest(), timeout=10)
        assert policy.policy.version == 0
        done = [
            r
            async for r in stub.Generate(
                inf.GenerateRequest(input_ids=[1, 2, 3], sampling_params=inf.SamplingParams(max_new_tokens=2)),
                timeout=60,
            )
        ]
        assert done and done[-1].HasField("completion")
        # The weight-update RPCs pass the token check and reach the protocol: an update
        # that was never prepared is a state error, not UNAUTHENTICATED.
        for call in (
            stub.AwaitWeightTransfer(inf.AwaitWeightTransferRequest(version=7), timeout=10),
            stub.CommitWeightUpdate(inf.CommitWeightUpdateRequest(version=7), timeout=10),
        ):
            assert await _code(call) == grpc.StatusCode.FAILED_PRECONDITION
        assert await _code(stub.AbortWeightUpdate(inf.AbortWeightUpdateRequest(version=7), timeout=10)) in (
            grpc.StatusCode.OK,
            grpc.StatusCode.FAILED_PRECONDITION,
            grpc.StatusCode.NOT_FOUND,
        )
    finally:
        await ch.close()


# ---- TrainerService ------------------------------------------------------------------


def _trainer_settings(**overrides) -> TrainerSettings:
    return TrainerSettings(grpc_port=0, inference=[], **overrides)


async def test_trainer_service_refuses_calls_without_the_token() -> None:
    server, port = create_trainer_server(_trainer_settings(service_token=TOKEN))
    await server.server.start()
    await server.set_serving(True)
    target = f"127.0.0.1:{port}"
    try:
        for token in (None, "wrong"):
            ch = channel(target, token=token)
            stub = tr_grpc.TrainerServiceStub(ch)
            codes = [
                await _code(stub.GetPolicy(tr.GetPolicyRequest(), timeout=10)),
                await _code(stub.GetTrainerStatus(tr.GetTrainerStatusRequest(), timeout=10)),
                await _code(stub.WatchPolicy(tr.WatchPolicyRequest(), timeout=10)),
            ]
            await ch.close()
            assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 3, (token, codes)
        assert await _health(target) == health_pb2.HealthCheckResponse.SERVING
        async with channel(target, token=TOKEN) as ch:
            stub = tr_grpc.TrainerServiceStub(ch)
            assert (await stub.GetPolicy(tr.GetPolicyRequest(), timeout=10)).policy.version == 0
            watch = stub.WatchPolicy(tr.WatchPolicyRequest(), timeout=10)
            assert (await watch.read()).policy.version == 0
            watch.cancel()
    finally:
        await server.server.stop(0)


def test_token_from_a_file_or_the_environment(tmp_path, monkeypatch) -> None:
    path = tmp_path / "token"
    path.write_text(f"  {TOKEN}\n")
    settings = load_settings(TrainerSettings, ["--service-token-file", str(path), "--gateway-token-file", str(path)])
    assert settings.service_token is not None and settings.gateway_token is not None
    assert settings.service_token.get_secret_value() == TOKEN
    assert settings.gateway_token.get_secret_value() == TOKEN
    monkeypatch.setenv("CLOTHO_TRAINER_SERVICE_TOKEN", "from-env")
    service_token = load_settings(TrainerSettings, []).service_token
    assert service_token is not None
    assert service_token.get_secret_value() == "from-env"
    with pytest.raises(ValueError, match="both set"):
        load_settings(TrainerSettings, ["--service-token-file", str(path)])


# ---- where services may listen --------------------------------------------------------


def _run_main(module: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.endswith("_SERVICE_TOKEN")}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env={**clean, "OMP_NUM_THREADS": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_non_loopback_bind_without_a_token_refuses_to_start(tiny_model_dir) -> None:
    inference = _run_main("services.inference", ["--model-path", str(tiny_model_dir), "--host", "0.0.0.0"])
    assert inference.returncode == 2, inference.stderr
    assert "beyond loopback" in inference.stderr and "--insecure" in inference.stderr
    assert "Traceback" not in inference.stderr
    trainer = _run_main("services.trainer", ["--host", "0.0.0.0", "--model-path", str(tiny_model_dir)])
    assert trainer.returncode == 2 and "beyond loopback" in trainer.stderr, trainer.stderr
    # The weight transfer's address counts as much as --host.
    trainer = _run_main(
        "services.trainer", ["--sync-address", "0.0.0.0", "--inference", "127.0.0.1:1", "--model-path", "x"]
    )
    assert trainer.returncode == 2 and "0.0.0.0" in trainer.stderr, trainer.stderr
    with pytest.raises(ExposureRefused):
        create_trainer_server(_trainer_settings(host="0.0.0.0"))


@pytest.mark.asyncio(loop_scope="module")
async def test_non_loopback_bind_starts_with_insecure_or_a_token(tiny_model_dir, tmp_path, service_process) -> None:
    args = ["--model-path", str(tiny_model_dir), "--host", "0.0.0.0", "--insecure"]
    async with service_process("services.inference", args, tmp_path / "insecure") as (_child, ready):
        # Open: a plain call works (the operator said --insecure in so many words).
        async with channel(f"127.0.0.1:{ready['grpc_port']}") as ch:
            info = await inf_grpc.InferenceServiceStub(ch).GetModelInfo(inf.GetModelInfoRequest(), timeout=10)
            assert info.model_name == Path(tiny_model_dir).name
    for settings in (
        _trainer_settings(host="0.0.0.0", insecure=True),
        _trainer_settings(host="0.0.0.0", service_token=TOKEN),
    ):
        server, port = create_trainer_server(settings)
        assert port > 0
        await server.server.stop(0)


def _listening(pid: int = os.getpid()) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket this process listens on, from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A: LISTEN
                continue
            hex_addr, hex_port = local.split(":")
            assert len(hex_addr) == width
            raw = bytes.fromhex(hex_addr)
            # /proc prints each 32-bit word little-endian.
            words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            import ipaddress

            addr = ipaddress.ip_address(words)
            if addr.version == 6 and addr.ipv4_mapped is not None:
                addr = addr.ipv4_mapped
            found.add((str(addr), int(hex_port, 16)))
    return found


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads /proc/net/tcp")
def test_rendezvous_store_and_transport_listen_on_the_configured_address() -> None:
    before = _listening()
    group = CollectiveGroup.host("gloo", "127.0.0.1", 2, f"clotho-{uuid.uuid4().hex[:8]}", 15.0)
    try:
        assert ("127.0.0.1", group.port) in _listening() - before
        # A second rank joins: the gloo transports of both ranks listen too.
        peer = CollectiveGroup("gloo", "127.0.0.1", group.port, 2, 1, group.group_name, 15.0)
        joined = threading.Thread(target=peer.connect)
        joined.start()
        group.connect()
        joined.join(30)
        assert group.connected and peer.connected
        opened = _listening() - before
        assert opened, "the store should be listening"
        assert {addr for addr, _port in opened} == {"127.0.0.1"}, opened
        peer.close()
    finally:
        group.close()


# ---- TLS ------------------------------------------------------------------------------


def _self_signed(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-addext", "basicConstraints=critical,CA:TRUE",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
async def test_tls_and_mtls_with_a_self_signed_certificate(tmp_path) -> None:
    cert, key = _self_signed(tmp_path)
    ca = cert.read_bytes()
    tls = {"tls_cert_file": str(cert), "tls_key_file": str(key), "service_token": TOKEN}
    # TLS: a client that trusts the certificate and holds the token gets through.
    server, port = create_trainer_server(_trainer_settings(**tls))
    await server.server.start()
    try:
        target = f"localhost:{port}"
        async with channel(target, token=TOKEN, credentials=grpc.ssl_channel_credentials(ca)) as ch:
            reply = await tr_grpc.TrainerServiceStub(ch).GetPolicy(tr.GetPolicyRequest(), timeout=10)
            assert reply.policy.version == 0
        async with channel(target, credentials=grpc.ssl_channel_credentials(ca)) as ch:
            assert await _code(tr_grpc.TrainerServiceStub(ch).GetPolicy(tr.GetPolicyRequest(), timeout=10)) == (
                grpc.StatusCode.UNAUTHENTICATED
            )
        async with channel(target, token=TOKEN) as ch:  # plaintext against a TLS port
            assert await _code(tr_grpc.TrainerServiceStub(ch).GetPolicy(tr.GetPolicyRequest(), timeout=5)) in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED,
            )
    finally:
        await server.server.stop(0)
    # mTLS: with a CA the server asks for a client certificate signed by it.
    server, port = create_trainer_server(_trainer_settings(tls_ca_file=str(cert), **tls))
    await server.server.start()
    try:
        target = f"localhost:{port}"
        anonymous = grpc.ssl_channel_credentials(ca)
        async with channel(target, token=TOKEN, credentials=anonymous) as ch:
            assert await _code(tr_grpc.TrainerServiceStub(ch).GetPolicy(tr.GetPolicyRequest(), timeout=5)) in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED,
            )
        from services.common.access import Access

        access = Access.from_settings(_trainer_settings(tls_ca_file=str(cert), **tls))
        async with access.channel(target) as ch:
            reply = await tr_grpc.TrainerServiceStub(ch).GetPolicy(tr.GetPolicyRequest(), timeout=10)
            assert reply.policy.version == 0
    finally:
        await server.server.stop(0)


# ---- what errors tell a client --------------------------------------------------------


class _Broken(tr_grpc.TrainerServiceServicer):
    async def GetPolicy(self, request, context):
        raise KeyError("/home/someone/secret/model.safetensors")

    async def WatchPolicy(self, request, context):
        yield tr.WatchPolicyResponse()
        raise ZeroDivisionError("internal state")


async def test_unexpected_errors_are_internal_and_name_nothing(caplog) -> None:
    srv = build_server("127.0.0.1", 0, [(tr_grpc.add_TrainerServiceServicer_to_server, _Broken(), "x")])
    await srv.server.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            stub = tr_grpc.TrainerServiceStub(ch)
            with pytest.raises(aio.AioRpcError) as unary:
                await stub.GetPolicy(tr.GetPolicyRequest(), timeout=10)
            call = stub.WatchPolicy(tr.WatchPolicyRequest(), timeout=10)
            await call.read()
            with pytest.raises(aio.AioRpcError) as stream:
                await call.read()
        for err in (unary.value, stream.value):
            assert err.code() == grpc.StatusCode.INTERNAL
            assert err.details() == INTERNAL_MESSAGE
        # The server's log has the whole story.
        assert "KeyError" in caplog.text and "ZeroDivisionError" in caplog.text
    finally:
        await srv.server.stop(0)
