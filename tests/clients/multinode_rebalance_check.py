"""Node-aware rebalancing live on a simulated 2-node Ray cluster (ray.cluster_utils.Cluster).

A GPU-less head and two nodes declaring two logical GPUs each; four workers ask for one GPU, so Ray
puts two on each node (few workers: the machine has 2 cores). A tiny Mixtral (16 experts, top-2)
gets Zipf-skewed traffic twice, the same requests each time: before and after the controller's
rebalance (the node-aware placement planner; the router then splits rows by the plan's shares).
From the router's counters (GetExpertLoad) it writes, per phase, each worker's rows and the rows
that crossed nodes per layer, and checks answers against the transformers block.
Usage: multinode_rebalance_check.py CHECKPOINT_DIR RESULT.json
"""

import json
import sys
from pathlib import Path

import ray
import torch
from ray.cluster_utils import Cluster

from moe_serve.bench.replication import skewed_tokens
from moe_serve.checkpoint import Checkpoint
from moe_serve.config import UpSettings
from moe_serve.launcher import launch_stack
from moe_serve.protos import moe_serve_pb2 as moe_pb2
from moe_serve.protos import moe_serve_pb2_grpc as moe_grpc
from moe_serve.security import open_channel
from tests.helpers import infer_request, kserve_stub, reference_blocks, reference_forward, response_tensors

REQUESTS_PER_LAYER, TOKENS = 12, 128


def counters(stack) -> tuple[dict[str, int], dict[int, int]]:
    with open_channel(stack.router.address, [], stack.credentials) as channel:
        reply = moe_grpc.RouterStub(channel).GetExpertLoad(moe_pb2.ExpertLoadRequest(), timeout=10)
    return dict(reply.worker_rows), {int(k): v for k, v in reply.cross_node_rows.items()}


def traffic(stack, checkpoint: Path, layers: list[int]) -> float:
    """The same Zipf-skewed requests every time; returns the largest difference from transformers."""
    spec_gates = {layer: Checkpoint(checkpoint).router_weights(layer).gate for layer in layers}
    blocks = reference_blocks(checkpoint, torch.float32)
    generator = torch.Generator().manual_seed(7)
    worst = 0.0
    channel, stub = kserve_stub(stack.address)
    with channel:
        for layer in layers:
            for _ in range(REQUESTS_PER_LAYER):
                hidden = skewed_tokens(spec_gates[layer], TOKENS, generator, exponent=1.2, pull=4.0)
                answer = response_tensors(stub.ModelInfer(infer_request(stack.model_name, hidden, layer), timeout=60))
                expected = reference_forward(blocks[layer], hidden)[0]
                worst = max(worst, float((answer["output"] - expected).abs().max()))
    return worst


def phase(stack, checkpoint: Path, layers: list[int]) -> dict:
    rows_before, cross_before = counters(stack)
    worst = traffic(stack, checkpoint, layers)
    rows_after, cross_after = counters(stack)
    current = {w.worker_id for w in stack.workers}
    rows = {w: rows_after.get(w, 0) - rows_before.get(w, 0) for w in sorted(current)}
    mean = sum(rows.values()) / len(rows)
    return {
        "worker_rows": rows,
        "max_over_mean": max(rows.values()) / mean,
        "cross_node_rows": {layer: cross_after.get(layer, 0) - cross_before.get(layer, 0) for layer in layers},
        "max_difference": worst,
    }


def main() -> None:
    checkpoint, result_path = Path(sys.argv[1]), Path(sys.argv[2])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0})
    for _ in range(2):
        cluster.add_node(num_cpus=1, num_gpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
    stack = launch_stack(UpSettings(port=0, workers=4, worker_num_gpus=1), checkpoint)
    try:
        layers = list(Checkpoint(checkpoint).spec.moe_layers)
        ray.get(stack.controller.rebalance.remote())  # starts the load window
        before = phase(stack, checkpoint, layers)
        report = ray.get(stack.controller.rebalance.remote())
        after = phase(stack, checkpoint, layers)
        result = {
            "nodes": sorted({w.node_id for w in stack.workers}),
            "placements": [[w.worker_id, w.node_id] for w in stack.workers],
            "rebalance": {"applied": report["applied"], "layers": {str(k): v for k, v in report["layers"].items()}},
            "before": before,
            "after": after,
        }
        result_path.write_text(json.dumps(result, indent=2))
    finally:
        stack.stop()
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
