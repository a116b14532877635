"""The GPU path: weights on the worker's GPU in the checkpoint dtype, results equal to transformers."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from expert_service.actor import ExpertWorkerActor
from expert_service.experts import ExpertStore
from moe_serve.checkpoint import Checkpoint
from moe_serve.cluster.launcher import launch_stack
from moe_serve.cluster.placement import ExpertKey
from moe_serve.config import UpSettings
from tests.helpers import infer_request, kserve_stub, reference_blocks, response_tensors

pytestmark = pytest.mark.gpu


def test_expert_store_keeps_weights_on_the_gpu_in_checkpoint_dtype(checkpoints) -> None:
    checkpoint = Checkpoint(checkpoints(torch.bfloat16))
    store = ExpertStore(checkpoint, [ExpertKey(0, e) for e in range(8)], torch.bfloat16, torch.device("cuda"))
    block = copy.deepcopy(reference_blocks(checkpoints(torch.bfloat16), torch.bfloat16)[0]).cuda()
    rows = torch.randn(5, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    for expert in range(8):
        with store.tier.use(ExpertKey(0, expert)) as weights:
            assert weights.up.device.type == "cuda" and weights.up.dtype == torch.bfloat16
        output = store.compute(ExpertKey(0, expert), rows)
        with torch.no_grad():
            gate, up = torch.nn.functional.linear(rows.cuda(), block.experts.gate_up_proj[expert]).chunk(2, dim=-1)
            expected = torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, block.experts.down_proj[expert])
        torch.testing.assert_close(output, expected.cpu(), rtol=0, atol=0)


def test_offloaded_experts_wait_pinned_in_host_memory_and_compute_the_same(checkpoints) -> None:
    checkpoint = Checkpoint(checkpoints(torch.bfloat16))
    keys = [ExpertKey(0, e) for e in range(8)]
    resident = ExpertStore(checkpoint, keys, torch.bfloat16, torch.device("cuda"))
    offloaded = ExpertStore(checkpoint, keys, torch.bfloat16, torch.device("cuda"), "0.25")
    rows = torch.randn(7, 64, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    for expert in [*range(8), *range(8)]:
        key = ExpertKey(0, expert)
        assert torch.equal(offloaded.compute(key, rows), resident.compute(key, rows))
        assert offloaded.host.get(key).up.is_pinned()  # the host tier is pinned: the copy runs asynchronously
        assert offloaded.tier.used_bytes <= offloaded.tier.budget_bytes
    assert offloaded.tier.stats.evictions > 0
    assert torch.cuda.memory_allocated() > 0


def test_stack_with_gpu_workers_equals_transformers(ray_cluster, checkpoints) -> None:
    directory = checkpoints(torch.bfloat16)
    stack = launch_stack(UpSettings(port=0, workers=2, worker_num_gpus=0.5), directory, worker_actor=ExpertWorkerActor)
    try:
        assert all(record.gpu_id >= 0 for record in stack.workers)
        block = copy.deepcopy(reference_blocks(directory, torch.bfloat16)[1]).cuda()
        hidden = torch.randn(33, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
        channel, stub = kserve_stub(stack.address)
        with channel:
            result = response_tensors(stub.ModelInfer(infer_request(stack.model_name, hidden, layer=1), timeout=60))
        with torch.no_grad():
            expected = block(hidden.cuda().unsqueeze(0))[0].cpu()
        torch.testing.assert_close(result["output"].float(), expected.float(), rtol=1.6e-2, atol=1e-2)
    finally:
        stack.stop()


def test_bench_on_the_gpu_reports_tokens_per_s_and_the_share_of_peak(tmp_path: Path) -> None:
    output = tmp_path / "results"
    command = [sys.executable, "-m", "moe_serve", "bench", "--device", "cuda", "--dtype", "bfloat16"]
    command += ["--hidden-size", "256", "--intermediate-size", "512", "--latency-requests", "20"]
    command += ["--throughput-tokens", "512", "--throughput-requests", "4", "--rounds", "2"]
    command += ["--sections", "sweep", "--sweep-tokens", "1,512,4096", "--output-dir", str(output)]
    # a Ray of its own (RAY_ADDRESS=local), beside the test session's, shut down when the bench ends
    environment = {**os.environ, "RAY_ADDRESS": "local"}
    completed = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    result = json.loads((output / "latest.json").read_text())
    gpu = result["gpu"]
    assert gpu["dtype"] == "bfloat16" and gpu["device"] == torch.cuda.get_device_name()
    assert gpu["peak_matmul_tflops"] > 10  # any CUDA GPU's bf16 tensor cores
    assert gpu["served"]["tokens_per_s"] == result["served"]["tokens_per_s"] > 0
    for subject in ("served", "reference"):
        assert 0 < gpu[subject]["fraction_of_peak"] < 1
    assert [point["tokens"] for point in gpu["sweep"]["served"]] == [1, 512, 4096]
    assert result["machine"]["gpu"] == gpu["device"]
