"""The monolithic KServe peer answers exactly what transformers' block computes, and a short bench
(a tiny shape, the thin section, message counting) prints and records sane fast-path figures.

Both start real processes: the peer as `python -m moe_serve.bench.monolithic`, the bench as
`python -m moe_serve bench` (its own Ray, stacks, peer and echo; never the session's Ray).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from moe_serve.bench.monolithic import start_monolithic
from moe_serve.bench.reference import reference_block, run_block
from moe_serve.bench.runner import make_request
from moe_serve.checkpoint import Checkpoint
from moe_serve_client.protos import grpc_predict_v2_pb2_grpc as kserve_grpc
from tests.helpers import REPOSITORY, reference_blocks, response_tensors, save_tiny_mixtral

BENCH_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_mixtral(tmp_path_factory.mktemp("ckpt") / "tiny-mixtral-monolithic", seed=5)


@pytest.fixture(scope="module")
def peer(checkpoint: Path) -> Iterator[kserve_grpc.GRPCInferenceServiceStub]:
    process = start_monolithic(checkpoint)
    try:
        with grpc.insecure_channel(process.address) as channel:
            yield kserve_grpc.GRPCInferenceServiceStub(channel)
    finally:
        process.stop()


def answer(stub: kserve_grpc.GRPCInferenceServiceStub, name: str, hidden: torch.Tensor) -> torch.Tensor:
    response = stub.ModelInfer(make_request(name, hidden), timeout=60)
    (output,) = response.outputs
    assert output.name == "output"
    return response_tensors(response)["output"]


@pytest.mark.parametrize("num_tokens", [1, 37])
def test_monolithic_peer_equals_the_transformers_block(checkpoint: Path, peer, num_tokens: int) -> None:
    hidden = torch.randn(num_tokens, 64, generator=torch.Generator().manual_seed(num_tokens))
    output = answer(peer, checkpoint.name, hidden)
    # the very block it runs, built the same way: bit for bit
    same_block = reference_block(Checkpoint(checkpoint), 0, "eager", torch.float32)
    assert torch.equal(output, run_block(same_block, hidden))
    # transformers' own model loaded from the files: within the exactness tests' FP32 tolerance
    loaded = reference_blocks(checkpoint, torch.float32)[0]
    torch.testing.assert_close(output, run_block(loaded, hidden), rtol=1e-5, atol=1e-5)


def test_monolithic_peer_refuses_what_the_gateway_refuses(checkpoint: Path, peer) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        answer(peer, "another-model", torch.zeros(1, 64))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as raised:
        answer(peer, checkpoint.name, torch.zeros(1, 63))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.slow
def test_short_bench_reports_the_fast_path(tmp_path: Path) -> None:
    """A tiny shape, few requests: the figures' plausibility, never their speed."""
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")])),
        # a Ray of its own even where `ray start` left a cluster in /tmp/ray/ray_current_cluster, which a plain
        # ray.init() would join (and die with, when whoever started it stops it)
        "RAY_ADDRESS": "local",
    }
    arguments = [
        *("--hidden-size", "64", "--intermediate-size", "96", "--workers", "2"),
        *("--latency-requests", "10", "--throughput-tokens", "32", "--throughput-requests", "2", "--rounds", "1"),
        *("--sections", "thin", "--fast-path-requests", "20", "--output-dir", str(tmp_path / "results")),
    ]
    completed = subprocess.run(
        [sys.executable, "-m", "moe_serve", "bench", *arguments],
        cwd=tmp_path,  # the bench's checkpoints go under ./.moe-serve
        env=environment,
        capture_output=True,
        text=True,
        timeout=BENCH_TIMEOUT_S,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "Fast path (issue 22)" in completed.stdout
    assert "messages per T=1 request" in completed.stdout
    result = json.loads((tmp_path / "results" / "latest.json").read_text())
    assert set(result["fast_path"]) == {"standard", "thin"}
    assert "ff8" in result["fast_path"]["thin"]["checkpoint"]
    for name, figures in result["fast_path"].items():
        assert set(figures["messages"]) == {"served", "served-service"}
        # k=2 on 2 workers: a token's experts sit on one worker or on both. With the router in its
        # own process each worker touched costs a compute request, a delivery, its ack and a compute
        # result; with the router in the gateway, a compute request and a compute result with the rows
        service = figures["messages"]["served-service"]
        per_type = {kind: entry["per_request"] for kind, entry in service["by_type"].items()}
        workers_touched = per_type["ComputeRequest"]
        assert 1.0 <= workers_touched <= 2.0, (name, per_type)
        for kind in ("Delivery", "DeliveryAck", "ComputeResult"):
            assert per_type[kind] == pytest.approx(workers_touched), (name, per_type)
        assert per_type["RouteRequest"] == per_type["RoutePlan"] == 1.0
        assert service["per_t1_request"] == pytest.approx(4 + 4 * workers_touched)
        embedded = figures["messages"]["served"]
        per_type = {kind: entry["per_request"] for kind, entry in embedded["by_type"].items()}
        workers_touched = per_type["ComputeRequest"]
        assert 1.0 <= workers_touched <= 2.0, (name, per_type)
        assert per_type["ComputeResult"] == pytest.approx(workers_touched), (name, per_type)
        assert set(per_type) == {"ModelInferRequest", "ModelInferResponse", "ComputeRequest", "ComputeResult"}
        assert embedded["per_t1_request"] == pytest.approx(2 + 2 * workers_touched)
        for messages in (service, embedded):
            assert messages["unmatched"] == {}, name
        hops = figures["hops"]["served"]
        stages = hops["gateway_ms"]
        assert set(stages) == {"decode", "route", "collect", "combine", "encode", "total"}
        assert all(value >= 0 for value in stages.values())
        assert sum(stages[s] for s in ("decode", "route", "collect", "combine", "encode")) <= stages["total"]
        assert hops["client_ms"]["mean"] > stages["total"]
        assert hops["expert_calls_per_request"] == pytest.approx(2.0)
        ratios = figures["ratios"]["served"]
        assert all(math.isfinite(value) for value in ratios.values())
        assert ratios["t1_p50_over_monolithic"] > 0 and ratios["tokens_per_s_over_monolithic"] > 0
    assert result["monolithic"]["t1_latency_ms"]["count"] == 10
    assert "served_t1_gap_in_echoes" in result["ratios"]
