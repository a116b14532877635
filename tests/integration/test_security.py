"""Security with real processes: TLS on the public port, mutual TLS on every internal hop, bearer tokens.

One stack (gateway and router processes, two Ray worker actors) runs with certificates written by
`moe-serve certs` and a tokens file; the test calls it as users and as intruders would.
"""

from __future__ import annotations

import http.client
import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from typer.testing import CliRunner

from expert_service.actor import ExpertWorkerActor
from gateway.auth import TokenTable, requested_model
from moe_serve.cli.main import app
from moe_serve.client import GatewayError, MoEClient
from moe_serve.cluster.launcher import Stack, launch_stack
from moe_serve.config import UpSettings
from moe_serve.runtime.security import ClusterCredentials, InternalTLS, open_channel
from moe_serve_client.protos import grpc_predict_v2_pb2 as kserve_pb2
from moe_serve_client.protos import grpc_predict_v2_pb2_grpc as kserve_grpc
from tests.helpers import infer_request, internal_credentials, reference_blocks, reference_forward
from tests.integration.test_triton_client import run_triton_client_check

FULL_TOKEN = "full-access-token-0123456789abcdef"
OTHER_TOKEN = "other-model-token-fedcba9876543210"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("certs")
    result = CliRunner().invoke(app, ["certs", str(directory)])
    assert result.exit_code == 0, result.output
    tokens = {
        "tokens": [
            {"name": "full", "token": FULL_TOKEN, "models": ["*"]},
            {"name": "other", "token": OTHER_TOKEN, "models": ["some-other-model"]},
        ]
    }
    (directory / "tokens.json").write_text(json.dumps(tokens))
    return directory


@pytest.fixture(scope="module")
def secure_stack(ray_cluster: str, checkpoints, certs: Path) -> Iterator[Stack]:
    settings = UpSettings(
        port=0,
        workers=2,
        log_level="DEBUG",  # the most talkative level still never logs a secret
        tls_cert=certs / "gateway.pem",
        tls_key=certs / "gateway.key",
        auth_tokens_file=certs / "tokens.json",
        internal_tls_ca=certs / "internal-ca.pem",
        internal_tls_cert=certs / "internal.pem",
        internal_tls_key=certs / "internal.key",
    )
    stack = launch_stack(settings, checkpoints(torch.float32), worker_actor=ExpertWorkerActor)
    yield stack
    stack.stop()


def secure_client(stack: Stack, certs: Path, token: str | None) -> MoEClient:
    return MoEClient(stack.address, root_certificates=(certs / "ca.pem").read_bytes(), token=token)


def test_tls_and_token_give_exact_answers(secure_stack: Stack, certs: Path, checkpoints) -> None:
    hidden = torch.randn(24, 64, generator=torch.Generator().manual_seed(3))
    block = reference_blocks(checkpoints(torch.float32), torch.float32)[1]
    with secure_client(secure_stack, certs, FULL_TOKEN) as client:
        assert client.server_ready(timeout=10)
        result = client.infer(secure_stack.model_name, hidden, layer=1, timeout=30)
    torch.testing.assert_close(result["output"], reference_forward(block, hidden)[0], rtol=1e-5, atol=1e-5)


def test_unmodified_triton_client_over_tls_with_a_token(
    secure_stack: Stack, certs: Path, checkpoints, tmp_path
) -> None:
    env = {"TRITON_CHECK_TLS_CA": str(certs / "ca.pem"), "TRITON_CHECK_TOKEN": FULL_TOKEN}
    # the certificate names localhost; tritonclient checks the name it dials
    address = secure_stack.address.replace("127.0.0.1", "localhost")
    run_triton_client_check(address, secure_stack.model_name, checkpoints(torch.float32), tmp_path, env)


def test_missing_or_unknown_token_is_unauthenticated(secure_stack: Stack, certs: Path) -> None:
    hidden = torch.randn(4, 64)
    for token in (None, "not-a-known-token"):
        with secure_client(secure_stack, certs, token) as client, pytest.raises(GatewayError) as raised:
            client.infer(secure_stack.model_name, hidden, timeout=10)
        assert raised.value.status_code == grpc.StatusCode.UNAUTHENTICATED
        assert "bearer token" in raised.value.message
    # garbage bytes from an unauthenticated caller are refused for the missing token, not parsed
    channel = grpc.secure_channel(secure_stack.address, grpc.ssl_channel_credentials((certs / "ca.pem").read_bytes()))
    raw = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    with pytest.raises(grpc.RpcError) as raw_error:
        raw(b"\xff\x00garbage", timeout=10)
    assert raw_error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    channel.close()


def test_token_lacking_the_model_is_permission_denied(secure_stack: Stack, certs: Path) -> None:
    credentials = grpc.ssl_channel_credentials((certs / "ca.pem").read_bytes())
    with grpc.secure_channel(secure_stack.address, credentials) as channel:
        stub = kserve_grpc.GRPCInferenceServiceStub(channel)
        metadata = (("authorization", f"Bearer {OTHER_TOKEN}"),)
        calls = {
            "ModelInfer": lambda: stub.ModelInfer(
                infer_request(secure_stack.model_name, torch.randn(2, 64)), metadata=metadata, timeout=10
            ),
            "ModelMetadata": lambda: stub.ModelMetadata(
                kserve_pb2.ModelMetadataRequest(name=secure_stack.model_name), metadata=metadata, timeout=10
            ),
            "ModelReady": lambda: stub.ModelReady(
                kserve_pb2.ModelReadyRequest(name=secure_stack.model_name), metadata=metadata, timeout=10
            ),
            "ModelConfig": lambda: stub.ModelConfig(
                kserve_pb2.ModelConfigRequest(name=secure_stack.model_name), metadata=metadata, timeout=10
            ),
            "ModelStatistics": lambda: stub.ModelStatistics(
                kserve_pb2.ModelStatisticsRequest(name=secure_stack.model_name), metadata=metadata, timeout=10
            ),
            "ModelStreamInfer": lambda: list(
                stub.ModelStreamInfer(
                    iter([infer_request(secure_stack.model_name, torch.randn(2, 64))]), metadata=metadata, timeout=10
                )
            ),
        }
        for name, call in calls.items():
            with pytest.raises(grpc.RpcError) as raised:
                call()
            assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED, name
            assert secure_stack.model_name in raised.value.details()
        # the same token may still ask about the server, and health probes need no token at all
        assert stub.ServerLive(kserve_pb2.ServerLiveRequest(), metadata=metadata, timeout=10).live
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_plaintext_client_cannot_use_the_tls_port(secure_stack: Stack) -> None:
    with grpc.insecure_channel(secure_stack.address) as channel, pytest.raises(grpc.RpcError) as raised:
        kserve_grpc.GRPCInferenceServiceStub(channel).ServerLive(kserve_pb2.ServerLiveRequest(), timeout=5)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


def internal_addresses(stack: Stack) -> dict[str, str]:
    addresses = {"router": stack.router.address, "gateway deliveries": stack.gateway.ready["delivery_address"]}
    addresses.update({f"worker {w.worker_id}": w.address for w in stack.workers})
    return addresses


def health_of(channel: grpc.Channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def test_internal_services_accept_only_the_internal_certificate(secure_stack: Stack, certs: Path) -> None:
    internal = InternalTLS.from_files(certs / "internal-ca.pem", certs / "internal.pem", certs / "internal.key")
    # a certificate from the public CA, and a client that trusts the internal CA but has no certificate
    public_client = grpc.ssl_channel_credentials(
        (certs / "internal-ca.pem").read_bytes(),
        (certs / "client.key").read_bytes(),
        (certs / "client.pem").read_bytes(),
    )
    no_certificate = grpc.ssl_channel_credentials((certs / "internal-ca.pem").read_bytes())
    name_override = internal.channel_options()
    addresses = internal_addresses(secure_stack)
    assert len(addresses) == 4
    for what, address in addresses.items():
        with open_channel(address, [], ClusterCredentials(internal_credentials().secret, internal)) as channel:
            assert health_of(channel) == health_pb2.HealthCheckResponse.SERVING, what
        intruders = {
            "plaintext": grpc.insecure_channel(address),
            "public client certificate": grpc.secure_channel(address, public_client, options=name_override),
            "no client certificate": grpc.secure_channel(address, no_certificate, options=name_override),
        }
        for kind, channel in intruders.items():
            with channel, pytest.raises(grpc.RpcError) as raised:
                health_of(channel)
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE, f"{what} accepted a {kind} caller"


def test_secrets_never_reach_logs_or_messages(secure_stack: Stack, certs: Path, tmp_path: Path) -> None:
    # failed calls with both tokens, then look at what the gateway and router printed (DEBUG level)
    for token in (OTHER_TOKEN, FULL_TOKEN + "x"):
        with secure_client(secure_stack, certs, token) as client, pytest.raises(GatewayError) as raised:
            client.infer(secure_stack.model_name, torch.randn(2, 64), timeout=10)
        assert token not in raised.value.message
    printed = "\n".join([*secure_stack.gateway.recent_output, *secure_stack.router.recent_output])
    secrets = [FULL_TOKEN, OTHER_TOKEN, *((certs / name).read_text() for name in ("gateway.key", "internal.key"))]
    for secret in secrets:
        assert secret.strip() not in printed
    assert "token 'other' refused" in printed  # tokens are named by their name, not their value
    # a client's repr never shows its token; a broken tokens file is reported without its contents
    with secure_client(secure_stack, certs, FULL_TOKEN) as client:
        assert FULL_TOKEN not in repr(client)
    broken = tmp_path / "tokens.json"
    broken.write_text('{"tokens": [{"token": "' + FULL_TOKEN + '", "models": "*"}]}')
    with pytest.raises(ValueError) as invalid:
        TokenTable.load(broken)
    assert FULL_TOKEN not in str(invalid.value)


def test_a_shared_memory_region_name_is_not_a_model_name() -> None:
    """A token limited to some models may manage shared-memory regions: their `name` is a region's."""
    assert requested_model(kserve_pb2.SystemSharedMemoryRegisterRequest(name="input_data", key="/k")) is None
    assert requested_model(kserve_pb2.SystemSharedMemoryStatusRequest(name="input_data")) is None
    assert requested_model(kserve_pb2.CudaSharedMemoryUnregisterRequest(name="input_data")) is None
    assert requested_model(kserve_pb2.ModelInferRequest(model_name="m")) == "m"
    assert requested_model(kserve_pb2.ModelMetadataRequest(name="m")) == "m"


def test_health_command_speaks_mutual_tls(secure_stack: Stack, certs: Path) -> None:
    internal = [
        "--internal-tls-ca",
        str(certs / "internal-ca.pem"),
        "--internal-tls-cert",
        str(certs / "internal.pem"),
        "--internal-tls-key",
        str(certs / "internal.key"),
    ]
    runner = CliRunner()
    assert runner.invoke(app, ["health", secure_stack.router.address, *internal]).exit_code == 0
    assert runner.invoke(app, ["health", secure_stack.router.address]).exit_code == 1
    public = runner.invoke(app, ["health", secure_stack.address, "--tls-ca", str(certs / "ca.pem")])
    assert public.exit_code == 0, public.output
    # what a container's health check does: the internal certificate comes from the environment
    env = {
        "MOE_SERVE_INTERNAL_TLS_CA": str(certs / "internal-ca.pem"),
        "MOE_SERVE_INTERNAL_TLS_CERT": str(certs / "internal.pem"),
        "MOE_SERVE_INTERNAL_TLS_KEY": str(certs / "internal.key"),
    }
    assert runner.invoke(app, ["health", secure_stack.router.address], env=env).exit_code == 0
    # and the public port still wins when asked for, with that environment
    public = runner.invoke(app, ["health", secure_stack.address, "--tls-ca", str(certs / "ca.pem")], env=env)
    assert public.exit_code == 0, public.output


def test_rest_over_tls_takes_the_same_tokens(secure_stack: Stack, certs: Path, checkpoints) -> None:
    """The REST port serves the public TLS certificate and checks the gRPC port's bearer tokens: 401
    without a known token, 403 for a model the token lacks (existing or not); health stays open."""
    context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    # the certificate names localhost
    base = f"https://{secure_stack.http_address.replace('127.0.0.1', 'localhost')}/v2"
    model = secure_stack.model_name
    hidden = torch.randn(3, 64, generator=torch.Generator().manual_seed(12))
    body = json.dumps(
        {"inputs": [{"name": "hidden_states", "datatype": "FP32", "shape": [3, 64], "data": hidden.tolist()}]}
    ).encode()

    def call(path: str, token: str | None, data: bytes | None = None) -> tuple[int, dict]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        request = urllib.request.Request(f"{base}{path}", data, headers)
        try:
            with urllib.request.urlopen(request, timeout=30, context=context) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            assert error.code != 401 or error.headers["WWW-Authenticate"] == "Bearer"
            return error.code, json.loads(error.read())

    assert call("/health/live", None)[0] == call("/health/ready", None)[0] == 200
    for token in (None, "not-a-known-token"):
        for path, data in (("", None), (f"/models/{model}", None), (f"/models/{model}/infer", body)):
            status, answer = call(path, token, data)
            assert status == 401 and "bearer token" in answer["error"], (path, token)
            assert token is None or token not in answer["error"]
    assert call("", OTHER_TOKEN)[0] == 200  # the server itself: any valid token
    for path, data in ((f"/models/{model}", None), (f"/models/{model}/ready", None), (f"/models/{model}/infer", body)):
        status, answer = call(path, OTHER_TOKEN, data)
        assert status == 403 and model in answer["error"], path
    assert call("/models/no-such-model", OTHER_TOKEN)[0] == 403  # a restricted token cannot probe names
    status, answer = call(f"/models/{model}/infer", FULL_TOKEN, body)
    assert status == 200
    block = reference_blocks(checkpoints(torch.float32), torch.float32)[0]
    output = torch.tensor(answer["outputs"][0]["data"], dtype=torch.float32).reshape(3, 64)
    torch.testing.assert_close(output, reference_forward(block, hidden)[0], rtol=1e-5, atol=1e-5)
    with pytest.raises((OSError, http.client.HTTPException)):  # plaintext HTTP to the TLS port: no answer
        urllib.request.urlopen(f"{base.replace('https', 'http')}/health/live", timeout=10)
