"""Triton's protocol extensions on the gateway, driven with plain gRPC stubs: ModelStreamInfer,
ModelConfig, ModelStatistics and RepositoryIndex (tritonclient itself: test_triton_client.py)."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
import torch

from moe_serve.cluster.processes import start_service_process
from moe_serve_client.protos import grpc_predict_v2_pb2 as kserve_pb2
from moe_serve_client.protos import model_config_pb2 as config_pb2
from tests.helpers import (
    gateway_stats,
    infer_request,
    kserve_stub,
    paused,
    reference_blocks,
    response_tensors,
    wait_until,
)

NOT_FOUND = grpc.StatusCode.NOT_FOUND


def test_server_metadata_lists_the_extensions_offered(fp32_client) -> None:
    server = fp32_client.ServerMetadata(kserve_pb2.ServerMetadataRequest())
    assert list(server.extensions) == ["parameters", "model_configuration", "statistics"]


def test_shared_memory_is_off_unless_the_gateway_allows_it(fp32_client) -> None:
    """As Triton without --allow-client-shm: registering answers UNIMPLEMENTED naming the flag (the
    extension itself: tests/integration/test_shared_memory_serving.py); CUDA shared memory is never offered."""
    for call, request in (
        (fp32_client.SystemSharedMemoryRegister, kserve_pb2.SystemSharedMemoryRegisterRequest(name="r", key="/k")),
        (fp32_client.SystemSharedMemoryUnregister, kserve_pb2.SystemSharedMemoryUnregisterRequest()),
        (fp32_client.CudaSharedMemoryRegister, kserve_pb2.CudaSharedMemoryRegisterRequest(name="r")),
        (fp32_client.CudaSharedMemoryStatus, kserve_pb2.CudaSharedMemoryStatusRequest()),
    ):
        with pytest.raises(grpc.RpcError) as raised:
            call(request, timeout=10)
        assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "--allow-client-shm" in raised.value.details() or "no GPU" in raised.value.details()
    status = fp32_client.SystemSharedMemoryStatus(kserve_pb2.SystemSharedMemoryStatusRequest(), timeout=10)
    assert status.regions == {}


def test_model_config_describes_the_layer(fp32_stack, fp32_client) -> None:
    name = fp32_stack.model_name
    config = fp32_client.ModelConfig(kserve_pb2.ModelConfigRequest(name=name)).config
    assert (config.name, config.platform, config.backend, config.max_batch_size) == (
        name,
        "pytorch_moe",
        "moe-serve",
        0,
    )
    assert list(config.version_policy.specific.versions) == [1]
    fp32, types = config_pb2.DataType.TYPE_FP32, config_pb2.DataType
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [("hidden_states", fp32, [-1, 64])]
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [
        ("output", fp32, [-1, 64]),
        ("router_logits", fp32, [-1, 8]),
        ("expert_ids", types.TYPE_INT32, [-1, 2]),
        ("expert_weights", fp32, [-1, 2]),
        ("dropped_mask", types.TYPE_BOOL, [-1, 2]),
    ]
    assert config.instance_group[0].kind == config_pb2.ModelInstanceGroup.Kind.KIND_MODEL
    assert not config.model_transaction_policy.decoupled
    assert config.parameters["num_experts"].string_value == "8"
    assert config.parameters["overflow"].string_value == "dropless"
    same = fp32_client.ModelConfig(kserve_pb2.ModelConfigRequest(name=name, version="1")).config
    assert same == config
    for request in (kserve_pb2.ModelConfigRequest(name="nope"), kserve_pb2.ModelConfigRequest(name=name, version="2")):
        with pytest.raises(grpc.RpcError) as raised:
            fp32_client.ModelConfig(request)
        assert raised.value.code() == NOT_FOUND


def _statistics(client, name: str = "") -> kserve_pb2.ModelStatistics:
    (stats,) = client.ModelStatistics(kserve_pb2.ModelStatisticsRequest(name=name)).model_stats
    return stats


def test_model_statistics_count_successes_failures_and_their_time(fp32_stack, fp32_client) -> None:
    name = fp32_stack.model_name
    before = _statistics(fp32_client, name)
    started_ms = time.time() * 1000
    for tokens in (1, 5, 17):
        fp32_client.ModelInfer(infer_request(name, torch.randn(tokens, 64)))
    with pytest.raises(grpc.RpcError):
        fp32_client.ModelInfer(infer_request(name, torch.full((2, 64), float("nan"))))
    after = _statistics(fp32_client)  # an empty name asks for every model: this one
    assert (after.name, after.version) == (name, "1")
    assert after.inference_count - before.inference_count == 3
    assert after.execution_count - before.execution_count == 3  # no cross-request batching here
    stats, earlier = after.inference_stats, before.inference_stats
    assert stats.success.count - earlier.success.count == 3
    assert stats.fail.count - earlier.fail.count == 1 and stats.fail.ns > earlier.fail.ns
    for phase in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert getattr(stats, phase).count == stats.success.count, phase
    # the four phases partition each request's time (each rounded to a nanosecond)
    phases = stats.queue.ns + stats.compute_input.ns + stats.compute_infer.ns + stats.compute_output.ns
    assert abs(phases - stats.success.ns) <= 4 * stats.success.count
    assert stats.compute_infer.ns - earlier.compute_infer.ns > 0
    assert started_ms - 1000 <= after.last_inference <= time.time() * 1000 + 1000
    with pytest.raises(grpc.RpcError) as raised:
        _statistics(fp32_client, "nope")
    assert raised.value.code() == NOT_FOUND


def test_repository_index_lists_the_model_as_ready(fp32_stack, fp32_client) -> None:
    for ready_only in (False, True):
        index = fp32_client.RepositoryIndex(kserve_pb2.RepositoryIndexRequest(ready=ready_only))
        assert [(m.name, m.version, m.state, m.reason) for m in index.models] == [
            (fp32_stack.model_name, "1", "READY", "")
        ]


def _stream_request(name: str, hidden: torch.Tensor, request_id: str, layer: int) -> kserve_pb2.ModelInferRequest:
    request = infer_request(name, hidden, layer=layer, outputs=("output", "expert_ids"))
    request.id = request_id
    return request


def test_stream_answers_every_request_exactly_and_errors_keep_the_stream_open(
    fp32_stack, fp32_client, checkpoints
) -> None:
    name, blocks = fp32_stack.model_name, reference_blocks(checkpoints(torch.float32), torch.float32)
    generator = torch.Generator().manual_seed(11)
    inputs = {f"r{i}": (torch.randn(tokens, 64, generator=generator), i % 2) for i, tokens in enumerate((1, 9, 3, 40))}
    requests = [_stream_request(name, hidden, rid, layer) for rid, (hidden, layer) in inputs.items()]
    bad_values = _stream_request(name, torch.full((2, 64), float("inf")), "bad-values", 0)
    bad_model = _stream_request("nope", torch.randn(2, 64), "bad-model", 0)
    # errors between good requests: each gets its own answer and the stream goes on
    sent = [requests[0], bad_values, requests[1], bad_model, requests[2], requests[3]]

    answers = list(fp32_client.ModelStreamInfer(iter(sent), timeout=60))

    assert sorted(a.infer_response.id for a in answers) == sorted(r.id for r in sent)
    by_id = {a.infer_response.id: a for a in answers}
    assert by_id["bad-values"].error_message.startswith("INVALID_ARGUMENT: ")
    assert "NaN or Inf" in by_id["bad-values"].error_message
    assert by_id["bad-model"].error_message.startswith("NOT_FOUND: ")
    for rid, (hidden, layer) in inputs.items():
        answer = by_id[rid]
        assert answer.error_message == ""
        tensors = response_tensors(answer.infer_response)
        with torch.no_grad():
            expected = blocks[layer](hidden.unsqueeze(0)).reshape(hidden.shape)
        torch.testing.assert_close(tensors["output"], expected, rtol=1e-5, atol=1e-5)
        assert tensors["expert_ids"].shape == (hidden.shape[0], 2)


def test_stream_reports_undecodable_messages_and_keeps_serving(fp32_stack) -> None:
    name = fp32_stack.model_name
    good = _stream_request(name, torch.randn(3, 64), "good", 0).SerializeToString()
    with grpc.insecure_channel(fp32_stack.address) as channel:
        stream = channel.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer",
            request_serializer=None,
            response_deserializer=kserve_pb2.ModelStreamInferResponse.FromString,
        )
        answers = list(stream(iter([b"\xff\x00garbage", good]), timeout=60))
    assert len(answers) == 2
    errors = [a.error_message for a in answers if a.error_message]
    assert len(errors) == 1 and errors[0].startswith("INVALID_ARGUMENT: request bytes are not a valid")
    assert [a.infer_response.id for a in answers if not a.error_message] == ["good"]


def test_cancelled_stream_frees_its_requests(slow_stack, slow_checkpoint) -> None:
    """A stream cancelled while its requests wait for expert rows (the worker paused) frees their
    admission and dispatches at once; the gateway then serves exact answers."""
    fields = ("inflight_requests", "inflight_tokens", "pending_dispatches")

    def held() -> dict[str, int]:
        stats = gateway_stats(slow_stack.delivery_address)
        return {name: getattr(stats, name) for name in fields}

    requests = [_stream_request(slow_stack.model, torch.randn(4, 64), f"c{i}", 0) for i in range(6)]
    channel, stub = kserve_stub(slow_stack.address)
    with channel:
        with paused(slow_stack.workers[0]):
            call = stub.ModelStreamInfer(iter(requests), timeout=60)
            wait_until(lambda: held()["pending_dispatches"] == 6, 30, "6 stream requests routed")
            call.cancel()
            wait_until(lambda: not any(held().values()), 3, "the stream's slots freed")
        hidden = torch.randn(8, 64)
        answers = list(stub.ModelStreamInfer(iter([_stream_request(slow_stack.model, hidden, "after", 0)]), timeout=60))
        block = reference_blocks(slow_checkpoint, torch.float32)[0]
        with torch.no_grad():
            expected = block(hidden.unsqueeze(0)).reshape(hidden.shape)
        torch.testing.assert_close(
            response_tensors(answers[0].infer_response)["output"], expected, rtol=1e-5, atol=1e-5
        )


def test_statistics_count_batches_as_executions_and_the_window_as_queueing(slow_stack) -> None:
    """With cross-request batching, concurrent requests ride one execution and wait in the queue."""
    gateway = start_service_process(
        "gateway-batching-stats",
        ["gateway", "--router-address", slow_stack.router.address, "--port", "0", "--batch-window-ms", "300"],
    )
    try:
        channel, stub = kserve_stub(gateway.address)
        with channel:
            model = str(gateway.ready["model"])
            futures = [stub.ModelInfer.future(infer_request(model, torch.randn(3, 64)), timeout=60) for _ in range(4)]
            for future in futures:
                future.result()
            stats = _statistics(stub, model)
    finally:
        gateway.stop()
    assert (stats.inference_count, stats.execution_count) == (4, 1)
    queue = stats.inference_stats.queue
    assert queue.count == 4 and queue.ns / queue.count > 0.15e9  # most of the 300 ms window


def test_a_stream_that_is_never_read_holds_at_most_its_slots() -> None:
    """The flow control of answer_stream alone: while the client reads nothing (every write
    blocks), at most MAX_INFLIGHT_PER_STREAM requests are taken from the stream and answered;
    once it reads, every request is answered, each exactly once."""
    from gateway.stream_infer import MAX_INFLIGHT_PER_STREAM, UnwrittenAnswers, answer_stream

    class UnreadStream:  # the part of a ServicerContext answer_stream uses: write()
        def __init__(self) -> None:
            self.reading, self.written = asyncio.Event(), []

        async def write(self, response: kserve_pb2.ModelStreamInferResponse) -> None:
            await self.reading.wait()
            self.written.append(response.infer_response.id)

    taken: list[str] = []

    async def requests():
        for index in range(5 * MAX_INFLIGHT_PER_STREAM):
            taken.append(f"q{index}")
            yield kserve_pb2.ModelInferRequest(id=f"q{index}")

    async def answer(request: kserve_pb2.ModelInferRequest) -> kserve_pb2.ModelInferResponse:
        return kserve_pb2.ModelInferResponse(id=request.id)

    unwritten = UnwrittenAnswers()  # what a draining gateway waits for

    async def scenario() -> tuple[int, int, list[str]]:
        stream = UnreadStream()
        call = asyncio.create_task(answer_stream(requests(), stream, answer, unwritten))
        await asyncio.sleep(0.2)
        held, owed = len(taken), unwritten.count
        stream.reading.set()
        await asyncio.wait_for(call, 10)
        return held, owed, stream.written

    held, owed, written = asyncio.run(scenario())
    assert held <= MAX_INFLIGHT_PER_STREAM + 1  # the slots, plus the one read and waiting for a slot
    assert owed == MAX_INFLIGHT_PER_STREAM and unwritten.count == 0
    assert sorted(written) == sorted(f"q{index}" for index in range(5 * MAX_INFLIGHT_PER_STREAM))
