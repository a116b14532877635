"""The family registry: every model_type is read by one family, every mechanism a family names has its
math in gating, and the routing family reported in ModelMetadata (the protocol) stays what clients check."""

from __future__ import annotations

import json
from pathlib import Path
from typing import get_args

import pytest

from moe_serve.layer.families import FAMILIES, family_of, spec_from_config
from moe_serve.layer.gating import MECHANISMS
from moe_serve.model_spec import RoutingMechanism
from moe_serve.runtime.errors import ConfigurationError
from tests.families import FAMILIES as TEST_FAMILIES

# model_type -> (routing family reported in ModelMetadata, gating mechanism); the reported names are
# what moe_serve_client's patch_model compares against
EXPECTED = {
    "mixtral": ("mixtral", "softmax_topk"),
    "qwen2_moe": ("qwen_moe", "softmax_topk"),
    "jamba": ("qwen_moe", "softmax_topk"),
    "deepseek_v2": ("deepseek_v2", "softmax_grouped_topk"),
    "deepseek_v3": ("deepseek_v3", "sigmoid_grouped_topk"),
    "minimax_m2": ("deepseek_v3", "sigmoid_grouped_topk"),
    "ernie4_5_moe": ("ernie4_5_moe", "softmax_biased_topk"),
    "lfm2_moe": ("lfm2_moe", "sigmoid_topk"),
    "granitemoe": ("granitemoe", "logit_topk_softmax"),
    "cohere2_moe": ("granitemoe", "logit_topk_softmax"),
    "cohere2_moe_sigmoid": ("granitemoe", "logit_topk_sigmoid"),
    "switch": ("switch", "switch_top1"),
}


def test_every_named_mechanism_has_its_math_in_gating() -> None:
    assert set(MECHANISMS) == set(get_args(RoutingMechanism))


def test_every_test_family_model_type_is_registered() -> None:
    model_types = {family.config().model_type for family in TEST_FAMILIES.values()}
    assert model_types <= set(FAMILIES)


def test_an_unknown_model_type_names_the_supported_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"supported: .*mixtral"):
        family_of("llama", tmp_path)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_reported_family_and_mechanism(name: str, tmp_path: Path) -> None:
    # the config.json save_pretrained would write
    config = json.loads(TEST_FAMILIES[name].config().to_json_string())
    routing = spec_from_config(config, tmp_path).routing
    assert (routing.family, routing.mechanism) == EXPECTED[name]
