"""tritonclient.grpc and moe-serve's client import together, in either order, and both work in one process.

Each case runs in a fresh interpreter (the clash it guards against happens at import, once per
process): it imports both, round-trips each one's messages through the other's, then sends the same
hidden states through both to a running gateway; the answers must match transformers' block.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import CLIENT_SCRIPTS, reference_blocks

CHECK_SCRIPT = CLIENT_SCRIPTS / "coexistence_check.py"


def run_check(order: str, address: str, model: str, tmp_path: Path) -> dict:
    hidden = torch.randn(5, 64, generator=torch.Generator().manual_seed(11))
    np.save(tmp_path / "input.npy", hidden.numpy())
    subprocess.run(
        [sys.executable, str(CHECK_SCRIPT), order, address, model, str(tmp_path / "input.npy"), str(tmp_path)],
        check=True,
        timeout=120,
        env=os.environ.copy(),
    )
    return json.loads((tmp_path / "result.json").read_text())


@pytest.mark.parametrize("order", ["triton-first", "ours-first"])
def test_both_clients_in_one_process_against_a_gateway(order: str, fp32_stack, checkpoints, tmp_path: Path) -> None:
    report = run_check(order, fp32_stack.address, fp32_stack.model_name, tmp_path)

    assert report["imported"][0] == ("tritonclient.grpc" if order == "triton-first" else "moe_serve.client")
    assert report["round_trips"] == {"ours_to_triton": True, "triton_to_ours": True, "separate_classes": True}
    assert report["ours_ready"] and report["triton_ready"]
    # numpy in, numpy out: the client returns arrays when it is given arrays
    assert report["ours_output_type"] == "numpy.ndarray"
    block = reference_blocks(checkpoints(torch.float32), torch.float32)[1]
    with torch.no_grad():
        expected = block(torch.from_numpy(np.load(tmp_path / "input.npy"))).numpy()
    ours, theirs = np.load(tmp_path / "ours_output.npy"), np.load(tmp_path / "triton_output.npy")
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


def test_light_client_and_tritonclient_without_a_gateway(tmp_path: Path) -> None:
    """The light client alone (no moe_serve server modules first) beside tritonclient, torch never loaded."""
    hidden = np.zeros((1, 4), np.float32)
    np.save(tmp_path / "input.npy", hidden)
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, tritonclient.grpc, moe_serve_client; "
            "from moe_serve_client.protos import grpc_predict_v2_pb2 as k; "
            "assert k.ServerLiveRequest.DESCRIPTOR.full_name == 'inference.ServerLiveRequest'; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))",
        ],
        check=True,
        timeout=60,
    )
