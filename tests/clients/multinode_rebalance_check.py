"""Node-aware rebalancing live on a simulated multi-node Ray cluster (ray.cluster_utils.Cluster).

A GPU-less head and NODES nodes declaring GPUS_PER_NODE logical GPUs each; one worker per GPU
(each asks for one GPU, so Ray fills every node). A tests.families model (the live test: a tiny
DeepSeek-V3, 256 routed experts in 8 groups, top-4 groups, top-8, one shared expert) gets
Zipf-skewed traffic twice, the same requests each time: before and after the controller's
rebalance (the node-aware placement planner; the router then splits rows by the plan's shares).
Per phase it writes each worker's rows and, per layer, the rows that crossed nodes, both from the
router's counters (GetExpertLoad) and from its Prometheus endpoint
(moe_serve_router_cross_node_rows_total), and the largest difference from the transformers block.
Usage: multinode_rebalance_check.py FAMILY CHECKPOINT_DIR RESULT.json NODES GPUS_PER_NODE
(tests/clients/multinode_checks.py runs it and multinode_check.py on one cluster.)
"""

import json
import sys
import time
from pathlib import Path

import ray
import torch
from ray.cluster_utils import Cluster

from expert_service.actor import ExpertWorkerActor
from moe_serve.bench.fastpath import local_address, scrape, sums
from moe_serve.bench.replication import skewed_tokens
from moe_serve.checkpoint import Checkpoint
from moe_serve.cluster.launcher import Stack, launch_stack
from moe_serve.cluster.placement import ExpertKey
from moe_serve.config import UpSettings
from moe_serve.protos import moe_serve_pb2 as moe_pb2
from moe_serve.protos import moe_serve_pb2_grpc as moe_grpc
from moe_serve.runtime.security import open_channel
from tests.clients.multinode_check import new_cluster
from tests.families import load_reference, reference_output
from tests.helpers import infer_request, kserve_stub, response_tensors

REQUESTS_PER_LAYER, TOKENS = 8, 128
CROSS_NODE_METRIC = "moe_serve_router_cross_node_rows_total"


def counters(stack: Stack) -> tuple[dict[str, int], dict[int, int], dict[int, int]]:
    """(rows per worker, cross-node rows per layer) from GetExpertLoad; cross-node rows per layer scraped."""
    with open_channel(stack.router.address, [], stack.credentials) as channel:
        reply = moe_grpc.RouterStub(channel).GetExpertLoad(moe_pb2.ExpertLoadRequest(), timeout=10)
    addresses = stack.metrics_addresses()  # an embedded router's metrics are on the gateway's endpoint
    scraped = sums(scrape(local_address(addresses.get("router", addresses["gateway"]))), CROSS_NODE_METRIC, "layer")
    return (
        dict(reply.worker_rows),
        {int(k): v for k, v in reply.cross_node_rows.items()},
        {int(k): int(v) for k, v in scraped.items()},
    )


def traffic(stack: Stack, family: str, checkpoint: Path, layers: list[int]) -> float:
    """The same Zipf-skewed requests every time; returns the largest difference from transformers."""
    gates = {layer: Checkpoint(checkpoint).router_weights(layer).gate for layer in layers}
    model = load_reference(family, checkpoint, torch.float32)
    generator = torch.Generator().manual_seed(7)
    worst = 0.0
    channel, stub = kserve_stub(stack.address)
    with channel:
        for layer in layers:
            for _ in range(REQUESTS_PER_LAYER):
                hidden = skewed_tokens(gates[layer], TOKENS, generator, exponent=1.2, pull=6.0)
                answer = response_tensors(stub.ModelInfer(infer_request(stack.model_name, hidden, layer), timeout=60))
                expected = reference_output(family, model, layer, hidden)
                worst = max(worst, float((answer["output"] - expected).abs().max()))
    return worst


def phase(stack: Stack, family: str, checkpoint: Path, layers: list[int]) -> dict:
    rows_before, cross_before, scraped_before = counters(stack)
    worst = traffic(stack, family, checkpoint, layers)
    rows_after, cross_after, scraped_after = counters(stack)
    rows = {w.worker_id: rows_after.get(w.worker_id, 0) - rows_before.get(w.worker_id, 0) for w in stack.workers}
    mean = sum(rows.values()) / len(rows)
    return {
        "worker_rows": dict(sorted(rows.items())),
        "max_over_mean": max(rows.values()) / mean,
        "cross_node_rows": {layer: cross_after.get(layer, 0) - cross_before.get(layer, 0) for layer in layers},
        "cross_node_rows_scraped": {
            layer: scraped_after.get(layer, 0) - scraped_before.get(layer, 0) for layer in layers
        },
        "max_difference": worst,
    }


def run(cluster: Cluster, family: str, checkpoint: Path, nodes: int, gpus_per_node: int) -> dict:
    """Add the nodes, serve one worker per GPU, measure before and after a rebalance; the nodes are
    removed after."""
    started = time.monotonic()
    added = [cluster.add_node(num_cpus=gpus_per_node, num_gpus=gpus_per_node) for _ in range(nodes)]
    try:
        cluster.wait_for_nodes()
        stack = launch_stack(
            UpSettings(port=0, http=False, workers=nodes * gpus_per_node, worker_num_gpus=1),
            checkpoint,
            worker_actor=ExpertWorkerActor,
        )
        try:
            ready_s = time.monotonic() - started
            spec = Checkpoint(checkpoint).spec
            layers = list(spec.moe_layers)
            ray.get(stack.controller.rebalance.remote())  # starts the load window
            before = phase(stack, family, checkpoint, layers)
            report = ray.get(stack.controller.rebalance.remote())
            after = phase(stack, family, checkpoint, layers)
            return {
                "family": family,
                "experts": {"routed": spec.num_experts, "shared": spec.num_shared_slots, "top_k": spec.top_k},
                "cluster": {"nodes": nodes, "gpus_per_node": gpus_per_node, "workers": len(stack.workers)},
                "nodes": sorted({w.node_id for w in stack.workers}),
                "placements": [[w.worker_id, w.node_id] for w in stack.workers],
                "rebalance": {"applied": report["applied"], "layers": {str(k): v for k, v in report["layers"].items()}},
                # workers holding each shared expert after the rebalance (every one: plan_layer_with_shared)
                "shared_expert_workers": {
                    f"{layer}:{expert}": sum(ExpertKey(layer, expert) in w.experts for w in stack.workers)
                    for layer in layers
                    for expert in range(spec.num_experts, spec.num_placed_experts)
                },
                "before": before,
                "after": after,
                "seconds": {"nodes_and_stack_ready": ready_s, "total": time.monotonic() - started},
            }
        finally:
            stack.stop()
    finally:
        for node in added:
            cluster.remove_node(node)


def main() -> None:
    family, checkpoint, result_path = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    nodes, gpus_per_node = int(sys.argv[4]), int(sys.argv[5])
    cluster = new_cluster()
    try:
        result_path.write_text(json.dumps(run(cluster, family, checkpoint, nodes, gpus_per_node), indent=2))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
