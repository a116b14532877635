"""The benchmark's Ray Serve composition computes the transformers MoE block, and leaves nothing behind.

One deployment per expert plus the ingress, on the session's Ray (never a second one); a tiny
4-expert checkpoint keeps the replicas few, so deploying takes seconds.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from moe_serve.bench.comparison import verify_against_reference
from moe_serve.bench.measure import run_concurrent
from moe_serve.bench.rayserve import ray_serve_layer
from tests.helpers import reference_blocks, reference_forward, save_tiny_mixtral


@pytest.fixture(scope="module")
def four_expert_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_mixtral(tmp_path_factory.mktemp("ckpt") / "tiny-mixtral-4e", num_local_experts=4, seed=3)


def serve_controller_running() -> bool:
    import ray

    return any(actor["name"] == "SERVE_CONTROLLER_ACTOR" for actor in ray.util.list_named_actors(all_namespaces=True))


@pytest.mark.slow
def test_rayserve_composition_equals_transformers_block(ray_cluster: str, four_expert_checkpoint: Path) -> None:
    reference = reference_blocks(four_expert_checkpoint, torch.float32)[0]
    hidden = torch.randn(37, 64, generator=torch.Generator().manual_seed(0))
    expected, _, expected_ids = reference_forward(reference, hidden)
    wrong = copy.deepcopy(reference)
    with torch.no_grad():
        wrong.experts.down_proj[1] *= 1.01  # one expert off by 1%: the correctness gate must notice
    with ray_serve_layer(four_expert_checkpoint) as layer:
        assert serve_controller_running()
        output = layer(hidden)
        single = layer(hidden[5:6])
        assert verify_against_reference(layer, reference, hidden) <= 1e-5
        with pytest.raises(RuntimeError, match="differs from the transformers block"):
            verify_against_reference(layer, wrong, hidden)

        @contextmanager
        def client(index: int) -> Iterator[Callable[[int], int]]:
            def call(i: int) -> int:
                start = (index + i) % 30
                rows = hidden[start : start + 7]
                torch.testing.assert_close(layer(rows), expected[start : start + 7], rtol=1e-5, atol=1e-5)
                return rows.shape[0]

            yield call

        concurrent = run_concurrent(client, clients=3, per_client=2)
        replicas_mib = layer.rss_mib()
    assert expected_ids.unique().numel() == 4, "the input should reach every expert deployment"
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(single, expected[5:6], rtol=1e-5, atol=1e-5)
    assert concurrent.tokens == 3 * 2 * 7 and len(concurrent.latencies_ms) == 6
    assert replicas_mib > 5 * 100, "five replica processes (ingress + 4 experts), each with torch loaded"
    assert not serve_controller_running(), "serve.shutdown() should leave no Serve controller holding resources"
