"""The monolithic peer: the whole MoE layer behind one KServe v2 endpoint, in one process.

A grpc *sync* server (a thread pool) whose ModelInfer decodes the request with the gateway's own
converters, runs transformers' MixtralSparseMoeBlock built from the checkpoint
(`bench.reference.reference_block`) and answers with the gateway's response encoding. It accepts and
answers exactly what the gateway does for the `output` tensor, so the same client can time both:
the difference is the disaggregated data path, nothing else. This is the baseline a served layer is
compared against (one client hop and the compute); gating outputs are not offered.

Run as `python -m moe_serve.bench.monolithic --checkpoint DIR --port 0`; prints the ready line with
its address.
"""

from __future__ import annotations

import argparse
import signal
import threading
import uuid
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any, TypeVar

import grpc
import torch

import moe_serve
from gateway.converters import InferenceResult, build_infer_response, model_metadata, parse_infer_request
from gateway.model import OUTPUT_NAME, ServedModel
from gateway.shared_memory import SharedMemoryRegistry
from moe_serve.bench.reference import reference_block, run_block
from moe_serve.checkpoint import Checkpoint
from moe_serve.cluster.processes import ServiceProcess, spawn_service_process
from moe_serve.config import DEFAULT_MAX_MESSAGE_BYTES
from moe_serve.runtime.allocator import tune_allocator
from moe_serve.runtime.errors import InvalidInput, MoEServeError, listed
from moe_serve.runtime.grpc_utils import announce_ready, server_options
from moe_serve_client.protos import grpc_predict_v2_pb2 as kserve_pb2
from moe_serve_client.protos import grpc_predict_v2_pb2_grpc as kserve_grpc

SERVER_NAME = "moe-serve-monolithic"
# a sync server: enough threads for the bench's concurrent clients; torch computes one call at a time
# per thread, and its own intra-op threads share the cores
SERVER_THREADS = 8
ResponseT = TypeVar("ResponseT")


def served_model(checkpoint: Checkpoint, name: str) -> ServedModel:
    """What the gateway would describe for `checkpoint` (a Mixtral-family checkpoint)."""
    spec = checkpoint.spec
    return ServedModel(
        name=name,
        family=spec.model_type,
        hidden_size=spec.hidden_size,
        num_experts=spec.num_experts,
        top_k=spec.top_k,
        moe_layers=tuple(spec.moe_layers),
        num_layers=spec.num_layers,
        compute_dtype=spec.dtype,
    )


def _answer(call: Callable[[], ResponseT], context: grpc.ServicerContext) -> ResponseT:
    """The one place domain errors become gRPC statuses (as the gateway's interceptor does)."""
    try:
        return call()
    except MoEServeError as error:
        context.abort(error.status_code, error.message)
        raise  # abort raises; this line is never reached


class MonolithicServicer(kserve_grpc.GRPCInferenceServiceServicer):
    """ModelInfer and the metadata calls tritonclient makes, for one model of MoE blocks by layer."""

    def __init__(self, model: ServedModel, blocks: dict[int, torch.nn.Module], device: torch.device) -> None:
        self.model, self.blocks, self.device = model, blocks, device

    def ServerLive(self, request: Any, context: grpc.ServicerContext) -> kserve_pb2.ServerLiveResponse:
        return kserve_pb2.ServerLiveResponse(live=True)

    def ServerReady(self, request: Any, context: grpc.ServicerContext) -> kserve_pb2.ServerReadyResponse:
        return kserve_pb2.ServerReadyResponse(ready=True)

    def ModelReady(self, request: Any, context: grpc.ServicerContext) -> kserve_pb2.ModelReadyResponse:
        return _answer(lambda: self._ready(request), context)

    def ServerMetadata(self, request: Any, context: grpc.ServicerContext) -> kserve_pb2.ServerMetadataResponse:
        return kserve_pb2.ServerMetadataResponse(name=SERVER_NAME, version=moe_serve.__version__)

    def ModelMetadata(self, request: Any, context: grpc.ServicerContext) -> kserve_pb2.ModelMetadataResponse:
        return _answer(lambda: self._metadata(request), context)

    def ModelInfer(
        self, request: kserve_pb2.ModelInferRequest, context: grpc.ServicerContext
    ) -> kserve_pb2.ModelInferResponse:
        return _answer(lambda: self.infer(request), context)

    def _ready(self, request: kserve_pb2.ModelReadyRequest) -> kserve_pb2.ModelReadyResponse:
        self.model.check_name(request.name, request.version)
        return kserve_pb2.ModelReadyResponse(ready=True)

    def _metadata(self, request: kserve_pb2.ModelMetadataRequest) -> kserve_pb2.ModelMetadataResponse:
        self.model.check_name(request.name, request.version)
        return model_metadata(self.model, {})

    def infer(self, request: kserve_pb2.ModelInferRequest) -> kserve_pb2.ModelInferResponse:
        """The gateway's decode, the whole layer in-process, the gateway's encode."""
        no_regions = SharedMemoryRegistry(enabled=False).lease()  # the peer is called with raw contents only
        inference = parse_infer_request(request, self.model, uuid.uuid4().hex, no_regions)
        if inference.requested_outputs != (OUTPUT_NAME,):
            raise InvalidInput(
                f"the monolithic peer returns only {OUTPUT_NAME!r}; asked for {listed(inference.requested_outputs)}"
            )
        hidden = inference.hidden_states.to(self.device, self.model.compute_dtype)
        output = run_block(self.blocks[inference.layer], hidden).to("cpu", inference.hidden_states.dtype)
        result = InferenceResult(tensors={OUTPUT_NAME: output})
        return build_infer_response(request, inference, result, self.model, no_regions)


def create_monolithic_server(
    checkpoint_dir: Path,
    host: str,
    port: int,
    implementation: str = "eager",
    model_name: str | None = None,
    device: str = "cpu",
) -> tuple[grpc.Server, int]:
    """A started sync server for `checkpoint_dir` (its name is the model name, as `moe-serve up` uses);
    returns (server, bound port)."""
    checkpoint = Checkpoint(checkpoint_dir)
    dtype, target = checkpoint.spec.dtype, torch.device(device)
    blocks = {
        layer: reference_block(checkpoint, layer, implementation, dtype).to(target)
        for layer in checkpoint.spec.moe_layers
    }
    model = served_model(checkpoint, model_name or checkpoint_dir.resolve().name)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=SERVER_THREADS), options=server_options(DEFAULT_MAX_MESSAGE_BYTES)
    )
    kserve_grpc.add_GRPCInferenceServiceServicer_to_server(MonolithicServicer(model, blocks, target), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    server.start()
    return server, bound


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--implementation", choices=("eager", "grouped_mm"), default="eager")
    parser.add_argument("--model-name", default=None, help="Default: the checkpoint directory's name.")
    parser.add_argument("--device", default="cpu", help="Where the block computes: cpu or cuda.")
    args = parser.parse_args(argv)
    tune_allocator()  # as the gateway does: large messages are sensitive to the allocator
    server, port = create_monolithic_server(
        args.checkpoint, args.host, args.port, args.implementation, args.model_name, args.device
    )
    stopped = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopped.set())
    announce_ready("monolithic", address=f"{args.host}:{port}")
    stopped.wait()
    server.stop(1).wait()


def spawn_monolithic(checkpoint_dir: Path, device: str = "cpu", implementation: str = "eager") -> ServiceProcess:
    """The peer as a child process, without waiting: its `.wait_ready()` returns once it listens."""
    args = ["--checkpoint", str(checkpoint_dir), "--port", "0", "--device", device, "--implementation", implementation]
    return spawn_service_process("monolithic", args, module="moe_serve.bench.monolithic")


def start_monolithic(checkpoint_dir: Path, device: str = "cpu", implementation: str = "eager") -> ServiceProcess:
    """The peer as a child process, once it listens (its address in `.address`)."""
    return spawn_monolithic(checkpoint_dir, device, implementation).wait_ready()


if __name__ == "__main__":
    main()
