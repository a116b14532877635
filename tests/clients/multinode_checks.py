"""Both multi-node checks on one simulated Ray cluster (ray.cluster_utils.Cluster), one after the other:
tests/clients/multinode_check.py (placement on three one-GPU nodes), then
tests/clients/multinode_rebalance_check.py (node-aware rebalancing on NODES nodes of GPUS_PER_NODE).

The cluster's head, the driver's connection and this process's imports (torch, Ray, transformers) are
paid once; each check adds its own nodes and removes them when done. Each check's result, or its
error, goes under its name in RESULT.json, so that a failure of one leaves the other's result.
Usage: multinode_checks.py CHECKPOINT_DIR FAMILY FAMILY_CHECKPOINT_DIR NODES GPUS_PER_NODE RESULT.json
"""

import json
import sys
import traceback
from pathlib import Path

import ray

from tests.clients import multinode_check, multinode_rebalance_check


def main() -> None:
    checkpoint, family, family_checkpoint = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    nodes, gpus_per_node, result_path = int(sys.argv[4]), int(sys.argv[5]), Path(sys.argv[6])
    checks = {
        "placement": lambda cluster: multinode_check.run(cluster, checkpoint),
        "rebalance": lambda cluster: multinode_rebalance_check.run(
            cluster, family, family_checkpoint, nodes, gpus_per_node
        ),
    }
    results: dict[str, dict] = {}
    cluster = multinode_check.new_cluster()
    try:
        for name, check in checks.items():
            try:
                results[name] = check(cluster)
            except Exception:
                results[name] = {"error": traceback.format_exc()}
            result_path.write_text(json.dumps(results, indent=2))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
