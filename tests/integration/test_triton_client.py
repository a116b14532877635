"""An unmodified third-party client (NVIDIA's tritonclient, gRPC flavour) talks to the gateway."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from tests.helpers import CLIENT_SCRIPTS, reference_blocks, reference_forward

CLIENT_SCRIPT = CLIENT_SCRIPTS / "triton_client_check.py"


def run_triton_client_check(
    address: str, model_name: str, checkpoint: Path, tmp_path: Path, env: dict[str, str] | None = None
) -> None:
    """Run tritonclient against `address` and check everything it saw against transformers."""
    hidden = torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(5))
    np.save(tmp_path / "input.npy", hidden.numpy())
    subprocess.run(
        [sys.executable, str(CLIENT_SCRIPT), address, model_name, str(tmp_path / "input.npy"), str(tmp_path)],
        check=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )

    report = json.loads((tmp_path / "result.json").read_text())
    assert report["live"] and report["ready"] and report["model_ready"]
    assert report["metadata"]["name"] == model_name
    assert report["metadata"]["inputs"][0]["name"] == "hidden_states"
    assert report["response_id"] == "t1"
    block = reference_blocks(checkpoint, torch.float32)[1]
    with torch.no_grad():
        expected = block(hidden).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "output.npy"), expected, rtol=1e-5, atol=1e-5)
    expected_ids = reference_forward(block, hidden.reshape(-1, 64))[2].numpy()
    np.testing.assert_array_equal(np.load(tmp_path / "expert_ids.npy"), expected_ids)
    assert report["nan_error"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "NaN or Inf" in report["nan_error"]["message"]

    # Triton's extensions, as tritonclient sees them
    config = report["config"]
    assert config["name"] == model_name and config["platform"] == "pytorch_moe"
    assert config["input"][0]["name"] == "hidden_states" and config["input"][0]["data_type"] == "TYPE_FP32"
    assert [output["name"] for output in config["output"]][:2] == ["output", "router_logits"]
    (stats,) = report["statistics"]["model_stats"]
    assert stats["name"] == model_name and int(stats["inference_count"]) >= 1
    assert int(stats["inference_stats"]["fail"]["count"]) >= 1  # the NaN request
    assert report["index"]["models"] == [{"name": model_name, "version": "1", "state": "READY"}]
    assert "model_configuration" in report["server_extensions"] and "statistics" in report["server_extensions"]
    # one streamed request per sequence of the batch (layer 1), plus the NaN one, answered with an error
    np.testing.assert_allclose(np.load(tmp_path / "streamed.npy"), expected, rtol=1e-5, atol=1e-5)
    (stream_error,) = report["stream_errors"]
    assert stream_error.startswith("INVALID_ARGUMENT: ") and "NaN or Inf" in stream_error


def test_triton_client_metadata_infer_and_errors(fp32_stack, checkpoints, tmp_path: Path) -> None:
    run_triton_client_check(fp32_stack.address, fp32_stack.model_name, checkpoints(torch.float32), tmp_path)
