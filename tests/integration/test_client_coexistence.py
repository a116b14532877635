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
    hidden = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(11))  # [B, S, d], as the block takes it
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


# What kserve's generated module does at import: register the KServe v2 file (package `inference`) in
# protobuf's default pool. kserve itself is not installed here; the child registers the same files there
# (their serialized descriptors, written by this process), before or after importing our client.
KSERVE_LIKE_REGISTRATION = """
import pathlib, sys
from google.protobuf import descriptor_pool
for name in ("model_config.bin", "grpc_predict_v2.bin"):
    descriptor_pool.Default().AddSerializedFile(pathlib.Path(sys.argv[1], name).read_bytes())
"""
USE_OURS = """
from google.protobuf import descriptor_pool
from moe_serve_client.protos import grpc_predict_v2_pb2 as ours
theirs = descriptor_pool.Default().FindMessageTypeByName("inference.ModelInferRequest")
assert ours.ModelInferRequest.DESCRIPTOR is not theirs
assert ours.ModelInferRequest(model_name="m").SerializeToString() == b"\\n\\x01m"
"""


@pytest.mark.parametrize("kserve_first", [True, False])
def test_a_default_pool_copy_of_the_kserve_protocol_does_not_clash(kserve_first: bool, tmp_path: Path) -> None:
    from moe_serve_client.protos import grpc_predict_v2_pb2, model_config_pb2

    (tmp_path / "model_config.bin").write_bytes(model_config_pb2.DESCRIPTOR.serialized_pb)
    (tmp_path / "grpc_predict_v2.bin").write_bytes(grpc_predict_v2_pb2.DESCRIPTOR.serialized_pb)
    code = (
        KSERVE_LIKE_REGISTRATION + USE_OURS
        if kserve_first
        else "import moe_serve_client\n" + KSERVE_LIKE_REGISTRATION + USE_OURS
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=60)
