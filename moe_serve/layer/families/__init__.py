"""The served model families, one module per family (or per few closely related ones).

Each family module holds what is specific to it: how its `config.json` reads into a `MoEModelSpec`, the
names its checkpoints give the router weights, and which gating mechanism it routes with (named by what
the mechanism does; its math is in `moe_serve.layer.gating`). `registry.py` registers them all by
`model_type`. The `family` a spec reports in ModelMetadata is part of the protocol and stays what
clients expect, even where it names another model (Cohere2-MoE reports "granitemoe", MiniMax-M2
"deepseek_v3").

| module        | model_type                                   | mechanism                                  |
| ------------- | -------------------------------------------- | ------------------------------------------ |
| mixtral       | mixtral, minimax                             | softmax_topk (renormalised)                |
| qwen_moe      | qwen2_moe, qwen3_moe, qwen3_next, olmoe,      | softmax_topk (renormalised if              |
|               | flex_olmo, jamba                             | norm_topk_prob); Qwen2/3-Next: gated shared |
| deepseek      | deepseek_v2                                  | softmax_grouped_topk                       |
|               | deepseek_v3, glm4_moe, glm4_moe_lite, dots1, | sigmoid_grouped_topk (bias for selection); |
|               | solar_open, exaone_moe, minimax_m2           | MiniMax-M2: logits in the activation dtype |
| ernie4_5_moe  | ernie4_5_moe                                 | softmax_biased_topk                        |
| lfm2_moe      | lfm2_moe                                     | sigmoid_topk (activation dtype)            |
| granitemoe    | granitemoe, cohere2_moe                      | logit_topk_softmax; Cohere2-MoE with       |
|               |                                              | "sigmoid" selection: logit_topk_sigmoid    |
| switch        | switch_transformers                          | switch_top1                                |
"""

from moe_serve.layer.families.base import Family, RouterPattern
from moe_serve.layer.families.registry import FAMILIES, family_of, spec_from_config

__all__ = ["FAMILIES", "Family", "RouterPattern", "family_of", "spec_from_config"]
