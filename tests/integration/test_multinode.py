"""Multi-node placement: every worker on a distinct (node, GPU) of a Ray cluster, results exact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import REPOSITORY

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
