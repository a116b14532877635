"""`moe-serve up --checkpoint org/name` serves a checkpoint from the Hugging Face cache, offline: the
cache is laid out as huggingface_hub lays a download out, HF_HOME points at it and HF_HUB_OFFLINE=1,
so nothing can be downloaded. The worker actors receive the id pinned to its commit and resolve it
from the same cache themselves."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.helpers import (
    UpCommand,
    infer_request,
    kserve_stub,
    lay_into_hub_cache,
    reference_blocks,
    reference_forward,
    response_tensors,
    save_tiny_mixtral,
)

REPO = "tiny-org/tiny-mixtral"
COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


@pytest.mark.slow
def test_up_serves_a_hub_id_from_the_cache_exactly(tmp_path: Path) -> None:
    saved = save_tiny_mixtral(tmp_path / "saved")
    hf_home = tmp_path / "hf-home"
    lay_into_hub_cache(saved, hf_home, REPO, COMMIT)
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    arguments = ["--checkpoint", REPO, "--port", "0", "--http-port", "0", "--metrics-port", "0", "--workers", "2"]
    up = UpCommand(tmp_path, arguments, env)
    try:
        ready = up.wait_ready()
        assert ready["model"] == "tiny-mixtral"  # the repository's name, not the snapshot's commit
        hidden = torch.randn(5, 64, generator=torch.Generator().manual_seed(5))
        channel, stub = kserve_stub(ready["address"])
        with channel:
            answer = response_tensors(stub.ModelInfer(infer_request(ready["model"], hidden, layer=1), timeout=60))
        expected, _, _ = reference_forward(reference_blocks(saved, torch.float32)[1], hidden)
        torch.testing.assert_close(answer["output"], expected, rtol=1e-5, atol=1e-5)
    finally:
        code = up.interrupt(90)
    assert code == 0, up.text[-4000:]
