"""Multi-node placement: every worker on a distinct (node, GPU) of a Ray cluster, results exact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import REPOSITORY, save_tiny_mixtral

ROOT = REPOSITORY


@pytest.mark.slow
def test_workers_land_on_distinct_nodes_and_gpus(checkpoints, tmp_path: Path) -> None:
    result_path = tmp_path / "result.json"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests" / "clients" / "multinode_check.py"),
            str(checkpoints(torch.float32)),
            str(result_path),
        ],
        check=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    result = json.loads(result_path.read_text())
    placements = [tuple(p) for p in result["placements"]]
    assert len(placements) == 3 and len(set(placements)) == 3
    assert {node for node, _ in placements} == set(result["gpu_nodes"])  # never the GPU-less head
    assert all(gpu >= 0 for _, gpu in placements)
    assert result["max_difference"] <= 1e-5


@pytest.mark.slow
def test_node_aware_rebalance_balances_workers_and_cuts_cross_node_rows(tmp_path: Path) -> None:
    """2 nodes x 2 workers (few: 2 cores), tiny Mixtral with 16 experts, the same Zipf-skewed traffic
    before and after the controller's rebalance; loads and cross-node rows from the router's counters."""
    checkpoint = save_tiny_mixtral(tmp_path / "tiny-mixtral-16", num_local_experts=16)
    result_path = tmp_path / "result.json"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests" / "clients" / "multinode_rebalance_check.py"),
            str(checkpoint),
            str(result_path),
        ],
        check=True,
        timeout=400,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    result = json.loads(result_path.read_text())
    assert len(result["nodes"]) == 2 and result["rebalance"]["applied"]
    before, after = result["before"], result["after"]
    assert before["max_over_mean"] > 1.3  # the skew is real
    assert after["max_over_mean"] <= 1.1
    for layer, crossed in after["cross_node_rows"].items():
        assert crossed < before["cross_node_rows"][layer]
    assert before["max_difference"] <= 1e-5 and after["max_difference"] <= 1e-5
