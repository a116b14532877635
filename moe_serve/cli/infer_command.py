"""`moe-serve infer`: send hidden states to a gateway over KServe v2 gRPC and summarise the answer."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import grpc
import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from moe_serve.config import DEFAULT_MAX_MESSAGE_BYTES
from moe_serve.runtime import codec
from moe_serve.runtime.grpc_utils import channel_options
from moe_serve.runtime.security import ClientCredentials
from moe_serve_client.protos import grpc_predict_v2_pb2 as kserve_pb2
from moe_serve_client.protos import grpc_predict_v2_pb2_grpc as kserve_grpc
from moe_serve_client.requests import infer_request, response_tensors

DEMO_MODEL_NAME = "mixtral-demo"


def _hidden_states(
    stub: kserve_grpc.GRPCInferenceServiceStub,
    model: str,
    tokens: int,
    input_file: Path | None,
    datatype: str,
    seed: int,
    timeout: float,
    metadata: tuple[tuple[str, str], ...] | None,
) -> torch.Tensor:
    if input_file is not None:
        return torch.from_numpy(np.load(input_file))
    described = stub.ModelMetadata(kserve_pb2.ModelMetadataRequest(name=model), timeout=timeout, metadata=metadata)
    hidden_size = int(described.inputs[0].shape[-1])
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, hidden_size, generator=generator).to(codec.torch_dtype(datatype))


def run_infer(
    console: Console,
    *,
    url: str,
    model: str | None,
    tokens: int,
    input_file: Path | None,
    layer: int,
    datatype: str,
    repeat: int,
    seed: int,
    timeout: float,
    credentials: ClientCredentials | None = None,
) -> int:
    model = model or DEMO_MODEL_NAME
    credentials = credentials or ClientCredentials()
    metadata = credentials.metadata()
    with credentials.channel(url, channel_options(DEFAULT_MAX_MESSAGE_BYTES)) as channel:
        stub = kserve_grpc.GRPCInferenceServiceStub(channel)
        try:
            hidden = _hidden_states(stub, model, tokens, input_file, datatype, seed, timeout, metadata)
            request = infer_request(
                model, hidden, layer=layer, outputs=("output", "expert_ids"), request_id="moe-serve-infer"
            )
            latencies = []
            for _ in range(max(1, repeat)):
                started = time.perf_counter()
                response = stub.ModelInfer(request, timeout=timeout, metadata=metadata)
                latencies.append((time.perf_counter() - started) * 1000)
        except grpc.RpcError as error:
            console.print(f"[red]{error.code().name}[/red]: {error.details()}")
            return 1
    tensors = response_tensors(response)
    output, expert_ids = tensors["output"], tensors["expert_ids"]
    usage = torch.bincount(expert_ids.reshape(-1).long())
    table = Table(title=f"{model} layer {layer} at {url}")
    table.add_column("")
    table.add_column("value")
    table.add_row("input", f"{codec.datatype_name(hidden.dtype)} {list(hidden.shape)}")
    table.add_row(
        "output", f"{response.outputs[0].datatype} {list(output.shape)}, mean |x| = {output.float().abs().mean():.4f}"
    )
    table.add_row("rows per expert", ", ".join(f"{e}:{int(n)}" for e, n in enumerate(usage.tolist())))
    table.add_row("latency p50", f"{statistics.median(latencies):.2f} ms over {len(latencies)} request(s)")
    Console().print(table)  # the result goes to stdout; diagnostics went to `console` (stderr)
    return 0
