"""Record a per-expert load trace from a short served run: the router's rows per (layer, expert).

A demo checkpoint (Mixtral layout, 64 experts, top-4, 4 MoE layers, d=64) is served by a local
stack with 2 workers; for each layer, requests of tokens pulled towards Zipf-drawn experts (a
different expert order per layer) go through the gateway; the router's GetExpertLoad counters are
read at the end and saved as a float array [layers, experts] (.npy), which
`moe-serve bench --only placement --placement-trace FILE` places beside the synthetic loads.

    PYTHONPATH=. python scripts/record_expert_trace.py benchmarks/results/placement/expert-trace.npy
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import grpc
import numpy as np
import ray
import torch

from expert_service.actor import ExpertWorkerActor
from moe_serve.bench.replication import skewed_tokens
from moe_serve.checkpoint import Checkpoint
from moe_serve.cli.demo import DemoShape, write_demo_checkpoint
from moe_serve.cluster.launcher import init_ray, launch_stack
from moe_serve.config import UpSettings
from moe_serve.protos import moe_serve_pb2 as moe_pb2
from moe_serve.protos import moe_serve_pb2_grpc as moe_grpc
from moe_serve.runtime.security import open_channel
from moe_serve_client.protos import grpc_predict_v2_pb2 as kserve_pb2
from moe_serve_client.protos import grpc_predict_v2_pb2_grpc as kserve_grpc
from moe_serve_client.requests import infer_request

SHAPE = DemoShape(hidden_size=64, intermediate_size=128, num_experts=64, top_k=4, num_layers=4)


def layer_request(model_name: str, hidden: torch.Tensor, layer: int) -> kserve_pb2.ModelInferRequest:
    return infer_request(model_name, hidden, layer=layer)


def record(output: Path, requests_per_layer: int, tokens: int, exponent: float, pull: float, seed: int) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint_dir = write_demo_checkpoint(Path(scratch) / "trace-demo", SHAPE)
        checkpoint = Checkpoint(checkpoint_dir)
        layers = list(checkpoint.spec.moe_layers)
        gates = {layer: checkpoint.router_weights(layer).gate for layer in layers}
        generator = torch.Generator().manual_seed(seed)
        init_ray(log_to_driver=False)
        stack = launch_stack(UpSettings(port=0, workers=2), checkpoint_dir, worker_actor=ExpertWorkerActor)
        try:
            # the router's counters are internal: the call carries the stack's cluster credentials
            router_channel = open_channel(stack.router.address, [], stack.credentials)
            with grpc.insecure_channel(stack.address) as channel, router_channel as rc:
                gateway = kserve_grpc.GRPCInferenceServiceStub(channel)
                for layer in layers:
                    order = torch.randperm(SHAPE.num_experts, generator=generator)  # this layer's hot experts
                    for _ in range(requests_per_layer):
                        hidden = skewed_tokens(gates[layer][order], tokens, generator, exponent, pull)
                        gateway.ModelInfer(layer_request(stack.model_name, hidden, layer), timeout=60)
                reply = moe_grpc.RouterStub(rc).GetExpertLoad(moe_pb2.ExpertLoadRequest(), timeout=10)
        finally:
            stack.stop()
            ray.shutdown()
    trace = np.zeros((len(layers), SHAPE.num_experts))
    for item in reply.experts:
        trace[layers.index(item.layer), item.expert] = item.rows
    output.parent.mkdir(parents=True, exist_ok=True)
    np.save(output, trace)
    print(f"wrote {output}: {trace.shape} rows per expert, {int(trace.sum())} rows in all")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--requests-per-layer", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--exponent", type=float, default=1.0, help="Zipf exponent of the preferred experts")
    parser.add_argument("--pull", type=float, default=3.0, help="how hard a token leans towards its preferred expert")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    record(args.output, args.requests_per_layer, args.tokens, args.exponent, args.pull, args.seed)


if __name__ == "__main__":
    main()
