"""Serves a checkpoint on a multi-node Ray cluster simulated with ray.cluster_utils.Cluster.

A head without GPUs and three nodes declaring one logical GPU each; workers ask for num_gpus=1,
so Ray must put each on its own (node, GPU). Runs in a process of its own because a test session
already has its Ray instance. Usage: multinode_check.py CHECKPOINT_DIR RESULT.json
(tests/clients/multinode_checks.py runs it and multinode_rebalance_check.py on one cluster.)
"""

import json
import sys
from pathlib import Path

import torch
from ray.cluster_utils import Cluster

from expert_service.actor import ExpertWorkerActor
from moe_serve.cluster.launcher import launch_stack
from moe_serve.config import UpSettings
from tests.helpers import infer_request, kserve_stub, reference_blocks, reference_forward, response_tensors


def new_cluster() -> Cluster:
    """A head without GPUs (nor Ray's dashboard, which nothing here uses), and the driver connected to it."""
    import ray

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0, "include_dashboard": False})
    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
    return cluster


def run(cluster: Cluster, checkpoint: Path) -> dict:
    """Add three one-GPU nodes, serve 3 workers, answer one request; the nodes are removed after."""
    nodes = [cluster.add_node(num_cpus=1, num_gpus=1) for _ in range(3)]
    try:
        cluster.wait_for_nodes()
        stack = launch_stack(
            UpSettings(port=0, workers=3, worker_num_gpus=1), checkpoint, worker_actor=ExpertWorkerActor
        )
        try:
            workers = stack.workers
            block = reference_blocks(checkpoint, torch.float32)[1]
            hidden = torch.randn(50, 64, generator=torch.Generator().manual_seed(3))
            channel, stub = kserve_stub(stack.address)
            with channel:
                request = infer_request(stack.model_name, hidden, layer=1)
                result = response_tensors(stub.ModelInfer(request, timeout=60))
            difference = float((result["output"] - reference_forward(block, hidden)[0]).abs().max())
            return {
                "placements": [[w.node_id, w.gpu_id] for w in workers],
                "gpu_nodes": [node.node_id for node in nodes],
                "max_difference": difference,
            }
        finally:
            stack.stop()
    finally:
        for node in nodes:
            cluster.remove_node(node)


def main() -> None:
    import ray

    checkpoint, result_path = Path(sys.argv[1]), Path(sys.argv[2])
    cluster = new_cluster()
    try:
        result_path.write_text(json.dumps(run(cluster, checkpoint)))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
