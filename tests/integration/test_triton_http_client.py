"""An unmodified third-party client (NVIDIA's tritonclient, HTTP flavour) talks to the gateway's REST port."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from tests.helpers import CLIENT_SCRIPTS, reference_blocks, reference_forward

CLIENT_SCRIPT = CLIENT_SCRIPTS / "triton_http_check.py"


def run_triton_http_check(
    http_address: str, model_name: str, checkpoint: Path, tmp_path: Path, env: dict[str, str] | None = None
) -> dict:
    """Run tritonclient.http against `http_address`; check its answers against transformers; return its report."""
    hidden = torch.randn(3, 4, 64, generator=torch.Generator().manual_seed(8))
    np.save(tmp_path / "input.npy", hidden.numpy())
    subprocess.run(
        [sys.executable, str(CLIENT_SCRIPT), http_address, model_name, str(tmp_path / "input.npy"), str(tmp_path)],
        check=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )
    report = json.loads((tmp_path / "result.json").read_text())
    assert report["live"] and report["ready"] and report["model_ready"]
    assert report["metadata"]["name"] == model_name
    assert report["metadata"]["inputs"][0]["name"] == "hidden_states"
    assert "binary_tensor_data" in report["server"]["extensions"]
    block = reference_blocks(checkpoint, torch.float32)[1]
    with torch.no_grad():
        expected = block(hidden).numpy()
    expected_ids = reference_forward(block, hidden.reshape(-1, 64))[2].numpy()
    for suffix in ("binary", "json"):
        output = np.load(tmp_path / f"output-{suffix}.npy")
        assert output.dtype == np.float32 and output.shape == (3, 4, 64)
        np.testing.assert_allclose(output, expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(np.load(tmp_path / f"expert_ids-{suffix}.npy"), expected_ids)
    # JSON numbers carry float32 exactly: both ways give the same bits
    np.testing.assert_array_equal(np.load(tmp_path / "output-binary.npy"), np.load(tmp_path / "output-json.npy"))
    assert report["id-binary"] == "b1" and report["id-json"] == "b0"
    assert report["default_outputs"] == ["output"]
    assert np.load(tmp_path / "output-default.npy").shape == (3, 4, 64)
    assert report["nan_error"]["status"] == "400" and "NaN or Inf" in report["nan_error"]["message"]
    assert report["unknown_model_error"]["status"] == "404"
    return report


def test_triton_http_client_metadata_infer_and_errors(fp32_stack, checkpoints, tmp_path: Path) -> None:
    run_triton_http_check(fp32_stack.http_address, fp32_stack.model_name, checkpoints(torch.float32), tmp_path)
