"""Every routing family through the full stack (gateway, router, a Ray worker) equals transformers.

One worker per stack: the family decides the gating, the shared expert and the combine, not how rows
spread over workers (tests/integration/test_exactness.py serves Mixtral from two, the scaling tests from more),
and a second worker actor would add about five seconds to each of these stacks.

Mixtral is covered in depth by tests/integration/test_exactness.py; here each other family is served from the
files save_pretrained wrote: Qwen2/3-MoE, DeepSeek-V3 and Switch in FP32 and BF16, the rest in one
dtype each (all of them in both in tests/unit/test_families_local.py), including its dense layers (refused with
INVALID_ARGUMENT), its shared expert (placed and served like any expert) and, for Switch, the
capacity its config declares (the gateway's default policy for that family).
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch

from moe_serve.config import UpSettings
from moe_serve.launcher import launch_stack
from tests.families import FAMILIES, load_reference, reference_output, reference_routing, save_family
from tests.helpers import infer_request, kserve_stub, response_tensors

OUTPUTS = ("output", "router_logits", "expert_ids", "dropped_mask")


# the families that reuse another's router, and DeepSeek-V2, in one dtype each
CASES = [
    *(
        pytest.param(family, dtype, id=f"{family}-{name}")
        for family in ("qwen2_moe", "qwen3_moe", "deepseek_v3", "switch")
        for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"))
    ),
    pytest.param("olmoe", torch.float32, id="olmoe-fp32"),
    pytest.param("deepseek_v2", torch.float32, id="deepseek_v2-fp32"),
    pytest.param("glm4_moe", torch.bfloat16, id="glm4_moe-bf16"),
    pytest.param("dots1", torch.bfloat16, id="dots1-bf16"),
    pytest.param("flex_olmo", torch.float32, id="flex_olmo-fp32"),
    pytest.param("granitemoe", torch.bfloat16, id="granitemoe-bf16"),
    pytest.param("qwen3_next", torch.bfloat16, id="qwen3_next-bf16"),
    pytest.param("minimax_m2", torch.bfloat16, id="minimax_m2-bf16"),
    pytest.param("cohere2_moe", torch.bfloat16, id="cohere2_moe-bf16"),
    pytest.param("ernie4_5_moe", torch.bfloat16, id="ernie4_5_moe-bf16"),
    pytest.param("lfm2_moe", torch.bfloat16, id="lfm2_moe-bf16"),
]


@pytest.mark.parametrize(("family", "dtype"), CASES)
def test_family_through_the_stack(ray_cluster, tmp_path: Path, family: str, dtype: torch.dtype) -> None:
    directory = save_family(family, tmp_path / family, dtype)
    model = load_reference(family, directory, dtype)
    stack = launch_stack(UpSettings(port=0, workers=1), directory)
    try:
        assert {key.expert for record in stack.workers for key in record.experts} >= set(range(4))
        channel, stub = kserve_stub(stack.address)
        with channel:
            for layer in FAMILIES[family].moe_layers:
                for num_tokens in (1, 9, 40):
                    generator = torch.Generator().manual_seed(100 * layer + num_tokens)
                    hidden = torch.randn(num_tokens, 64, generator=generator).to(dtype)
                    request = infer_request(stack.model_name, hidden, layer=layer, outputs=OUTPUTS)
                    result = response_tensors(stub.ModelInfer(request, timeout=60))
                    logits, ids = reference_routing(family, model, layer, hidden)
                    assert torch.equal(result["expert_ids"].long(), ids), (family, layer, num_tokens)
                    torch.testing.assert_close(result["router_logits"], logits, rtol=0, atol=0)
                    expected = reference_output(family, model, layer, hidden)
                    tolerance = 1e-5 if dtype == torch.float32 else 0.0
                    torch.testing.assert_close(result["output"], expected, rtol=tolerance, atol=tolerance)
                    # dropped slots: only Switch has a capacity of its own; a dropped token outputs 0
                    dropped = result["dropped_mask"]
                    if family != "switch":
                        assert not bool(dropped.any())
                    else:
                        assert torch.equal(dropped[:, 0], (expected == 0).all(dim=-1))
            dense = sorted(set(range(3)) - set(FAMILIES[family].moe_layers))
            if dense and family != "switch":
                with pytest.raises(grpc.RpcError) as raised:
                    stub.ModelInfer(infer_request(stack.model_name, hidden, layer=dense[0]), timeout=30)
                assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "dense layer" in raised.value.details()
    finally:
        stack.stop()
