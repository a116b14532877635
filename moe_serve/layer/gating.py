"""Router gating math: hidden states -> (router logits, top-k expert ids, combine weights).

One function per mechanism, named by what it computes (`MECHANISMS`); a family names the mechanism
it routes with in its RoutingConfig (moe_serve/layer/families/), as vLLM's router factory picks a
router by mechanism rather than by model.

Each family is computed exactly as its `transformers` module computes it, so the served layer
picks the same experts as the model. Everything from the logits on (softmax or sigmoid, top-k,
renormalisation) runs in float32 whatever the activation dtype. The logits matmul runs in the
dtype the model runs it in: the activation dtype for Mixtral and Qwen (then upcast), float32 for
DeepSeek-V2/V3 and Switch, because any other rounding of the logits would flip near-tied choices
and the served layer would no longer equal the model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moe_serve.checkpoint import RouterWeights
from moe_serve.model_spec import RoutingConfig


@dataclass(frozen=True)
class GatingResult:
    """Routing of T tokens.

    router_logits: [T, E] float32, the model's router logits.
    selection_scores: [T, E] float32, what top-k selection ranked; a token's next-best expert
        is the next one in this order.
    expert_ids: [T, k] int64, chosen experts in the model's top-k order.
    expert_weights: [T, k] float32, combine weights of the chosen experts.
    weight_scores: [T, E] float32, the per-expert score a combine weight is made of (for a
        slot moved to another expert by the capacity rule).
    shared_weights: [T, S] float32 scale of the shared expert's output (S = 0 or 1).
    """

    router_logits: torch.Tensor
    selection_scores: torch.Tensor
    expert_ids: torch.Tensor
    expert_weights: torch.Tensor
    weight_scores: torch.Tensor
    shared_weights: torch.Tensor


def compute_gating(
    hidden_states: torch.Tensor,
    router: RouterWeights,
    routing: RoutingConfig,
    num_shared_slots: int = 0,
    noise: torch.Generator | None = None,
) -> GatingResult:
    """Gate `hidden_states` [T, d] of one layer under `routing`.

    `noise` seeds noisy top-k gating when `routing.noise_std` > 0 (experiments only).
    """
    mechanism = MECHANISMS.get(routing.mechanism)
    if mechanism is None:
        raise ValueError(f"no gating mechanism {routing.mechanism!r}")
    hidden_states = aligned_for_blas(hidden_states)
    logits, selection, ids, weights, weight_scores = mechanism(hidden_states, router, routing, noise)
    shared_weights = _shared_weights(hidden_states, router, num_shared_slots)
    if routing.output_scale != 1.0:
        # a power of two (Cohere2-MoE's average: 0.5) scales every product and sum exactly
        weights, shared_weights = weights * routing.output_scale, shared_weights * routing.output_scale
    return GatingResult(
        router_logits=logits,
        selection_scores=selection,
        expert_ids=ids,
        expert_weights=weights,
        weight_scores=weight_scores,
        shared_weights=shared_weights,
    )


# CPU BLAS kernels split a row's dot product differently when its buffer is not on a 64-byte
# boundary, so the same product can differ in the last bit. Tensors torch allocates are 64-byte
# aligned; a tensor decoded from protobuf bytes sits wherever Python put the bytes. The copy keeps
# the logits (and so near-tied expert choices) bit-identical to the model's.
_BLAS_ALIGNMENT = 64


def aligned_for_blas(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` itself when contiguous on a 64-byte boundary (or not on the CPU), else an aligned copy."""
    if tensor.device.type != "cpu" or (tensor.is_contiguous() and tensor.data_ptr() % _BLAS_ALIGNMENT == 0):
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


def copy_keeping_alignment(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of `tensor` whose address has the same offset from a 64-byte boundary.

    A model loaded from safetensors computes with weights mapped at their offsets in the file;
    a router weight copied to the same offset gives the model's logits bit for bit.
    """
    nbytes = tensor.numel() * tensor.element_size()
    offset = tensor.data_ptr() % _BLAS_ALIGNMENT
    if offset % tensor.element_size():
        return tensor.clone(memory_format=torch.contiguous_format)
    storage = torch.empty(nbytes + _BLAS_ALIGNMENT, dtype=torch.uint8, device=tensor.device)
    start = (offset - storage.data_ptr()) % _BLAS_ALIGNMENT
    copy = storage[start : start + nbytes].view(tensor.dtype).reshape(tensor.shape)
    return copy.copy_(tensor)


# (router logits, selection scores, expert ids, combine weights, weight scores)
Rule = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _softmax_top_k(
    hidden: torch.Tensor, router: RouterWeights, routing: RoutingConfig, noise: torch.Generator | None
) -> Rule:
    # MixtralTopKRouter / Qwen*MoeTopKRouter: logits in the activation dtype, the rest in float32
    logits = F.linear(hidden, router.gate.to(hidden.dtype)).float()
    if routing.noise_std > 0:
        return _noisy_top_k(logits, routing, noise)
    probabilities = torch.softmax(logits, dim=-1)
    top_weights, top_ids = torch.topk(probabilities, routing.top_k, dim=-1)
    if routing.normalize_top_k:
        top_weights = top_weights / top_weights.sum(dim=-1, keepdim=True)
    return logits, probabilities, top_ids, top_weights, probabilities


def _logit_top_k_softmax(
    hidden: torch.Tensor, router: RouterWeights, routing: RoutingConfig, noise: torch.Generator | None
) -> Rule:
    # GraniteMoeTopKRouter: top-k of the logits (not of probabilities), softmax over the k kept
    logits = F.linear(hidden, router.gate.to(hidden.dtype)).float()
    top_logits, top_ids = torch.topk(logits, routing.top_k, dim=-1)
    probabilities = torch.softmax(logits, dim=-1)  # what rerouting renormalises over the kept slots
    return logits, logits, top_ids, torch.softmax(top_logits, dim=-1), probabilities


def _logit_top_k_sigmoid(
    hidden: torch.Tensor, router: RouterWeights, routing: RoutingConfig, noise: torch.Generator | None
) -> Rule:
    # Cohere2MoeTopKRouter with expert_selection_fn "sigmoid": top-k of the logits, then the sigmoid
    # of the kept logits in the activation dtype, renormalised when normalize_top_k
    logits = F.linear(hidden, router.gate.to(hidden.dtype)).float()
    top_logits, top_ids = torch.topk(logits, routing.top_k, dim=-1)
    top_weights = top_logits.to(hidden.dtype).sigmoid()
    if routing.normalize_top_k:
        top_weights = top_weights / top_weights.sum(dim=-1, keepdim=True)
    return logits, logits, top_ids, top_weights.float(), logits.sigmoid()


def _noisy_top_k(logits: torch.Tensor, routing: RoutingConfig, noise: torch.Generator | None) -> Rule:
    """Noisy top-k gating (Shazeer et al. 2017): top-k of logits + N(0, std), softmax over the kept ones."""
    noisy = logits + torch.randn(logits.shape, generator=noise) * routing.noise_std
    top_logits, top_ids = torch.topk(noisy, routing.top_k, dim=-1)
    noisy_probabilities = torch.softmax(noisy, dim=-1)
    return logits, noisy_probabilities, top_ids, torch.softmax(top_logits, dim=-1), noisy_probabilities


def _sigmoid_grouped_top_k(
    hidden: torch.Tensor, router: RouterWeights, routing: RoutingConfig, noise: torch.Generator | None
) -> Rule:
    # DeepseekV3TopkRouter: float32 logits, sigmoid scores, bias only for choosing
    # (MiniMaxM2TopKRouter: the same on logits in the activation dtype, one group)
    if routing.logits_in_activation_dtype:
        logits = F.linear(hidden, router.gate.to(hidden.dtype)).float()
    else:
        logits = F.linear(hidden.float(), router.gate.float())
    scores = logits.sigmoid()
    bias = router.selection_bias.float() if router.selection_bias is not None else torch.zeros(scores.shape[-1])
    choice = scores + bias
    num_tokens, num_experts = choice.shape
    groups = choice.view(num_tokens, routing.num_groups, num_experts // routing.num_groups)
    group_scores = groups.topk(2, dim=-1)[0].sum(dim=-1) if groups.shape[-1] > 1 else groups[..., 0]
    group_ids = torch.topk(group_scores, k=routing.top_k_groups, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_ids, 1)
    expert_mask = group_mask.unsqueeze(-1).expand(-1, -1, groups.shape[-1]).reshape(num_tokens, num_experts)
    choice = choice.masked_fill(~expert_mask.bool(), float("-inf"))
    top_ids = torch.topk(choice, k=routing.top_k, dim=-1, sorted=False)[1]
    top_weights = scores.gather(1, top_ids)
    if routing.normalize_top_k:
        top_weights = top_weights / (top_weights.sum(dim=-1, keepdim=True) + 1e-20)
    return logits, choice, top_ids, top_weights * routing.routed_scaling_factor, scores


def _softmax_biased_top_k(
    hidden: torch.Tensor, router: RouterWeights, routing: RoutingConfig, noise: torch.Generator | None
) -> Rule:
    # Ernie4_5_MoeTopKRouter: float32 softmax; top-k of probabilities + bias; the chosen probabilities
    # renormalised by their sum clamped to moe_norm_min
    logits = F.linear(hidden.float(), router.gate.float())
    probabilities = torch.softmax(logits, dim=-1)
    choice = probabilities
    if router.selection_bias is not None:
        choice = probabilities + router.selection_bias.float()
    top_ids = torch.topk(choice, routing.top_k, dim=-1)[1]
    top_weights = probabilities.gather(1, top_ids)
    top_weights = top_weights / top_weights.sum(dim=-1, keepdim=True).clamp(min=routing.norm_min)
    return logits, choice, top_ids, top_weights, probabilities


def _sigmoid_top_k(
    hidden: torch.Tensor, router: RouterWeights, routing: RoutingConfig, noise: torch.Generator | None
) -> Rule:
    # Lfm2MoeTopKRouter: sigmoid scores, gathering, renormalising and scaling all in the activation
    # dtype; only the choice (scores + expert_bias) is float32
    logits = F.linear(hidden, router.gate.to(hidden.dtype))
    scores = logits.sigmoid()
    choice = scores.float()
    if router.selection_bias is not None:
        choice = scores + router.selection_bias.float()
    top_ids = torch.topk(choice, routing.top_k, dim=-1)[1]
    top_weights = scores.gather(1, top_ids)
    if routing.normalize_top_k:
        top_weights = top_weights / (top_weights.sum(dim=-1, keepdim=True) + 1e-6)
    top_weights = top_weights * routing.routed_scaling_factor
    return logits.float(), choice, top_ids, top_weights.float(), scores.float()


def _softmax_grouped_top_k(
    hidden: torch.Tensor, router: RouterWeights, routing: RoutingConfig, noise: torch.Generator | None
) -> Rule:
    # DeepseekV2TopkRouter: float32 logits, softmax scores; "group_limited_greedy" (num_groups > 1)
    # keeps the experts of the top_k_groups groups with the highest best score, zeroing the rest;
    # top-k by score, not renormalised, times routed_scaling_factor
    logits = F.linear(hidden.float(), router.gate.float())
    scores = logits.softmax(dim=-1, dtype=torch.float32)
    choice = scores
    if routing.num_groups > 1:
        num_tokens, num_experts = scores.shape
        group_scores = scores.view(num_tokens, routing.num_groups, -1).max(dim=-1).values
        group_ids = torch.topk(group_scores, k=routing.top_k_groups, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_ids, 1)
        expert_mask = group_mask.unsqueeze(-1).expand(-1, -1, num_experts // routing.num_groups)
        choice = scores.masked_fill(~expert_mask.reshape(num_tokens, num_experts).bool(), 0.0)
    top_weights, top_ids = torch.topk(choice, k=routing.top_k, dim=-1, sorted=False)
    return logits, choice, top_ids, top_weights * routing.routed_scaling_factor, scores


def _switch_top_1(
    hidden: torch.Tensor, router: RouterWeights, routing: RoutingConfig, noise: torch.Generator | None
) -> Rule:
    # SwitchTransformersTop1Router: float32 router, probabilities rounded to the activation dtype,
    # argmax of those, weight = the chosen probability
    logits = F.linear(
        hidden.float(), router.gate.float(), None if router.gate_bias is None else router.gate_bias.float()
    )
    probabilities = torch.softmax(logits, dim=-1, dtype=torch.float32).to(hidden.dtype)
    top_ids = torch.argmax(probabilities, dim=-1, keepdim=True)
    top_weights = torch.max(probabilities, dim=-1, keepdim=True).values
    probabilities = probabilities.float()
    return logits, probabilities, top_ids, top_weights.float(), probabilities


def _shared_weights(hidden: torch.Tensor, router: RouterWeights, num_shared_slots: int) -> torch.Tensor:
    """Scale of the shared expert: sigmoid(shared_gate(x)) in the activation dtype (Qwen2), else 1."""
    if num_shared_slots == 0:
        return torch.empty(hidden.shape[0], 0)
    if router.shared_gate is None:
        return torch.ones(hidden.shape[0], 1)
    return torch.sigmoid(F.linear(hidden, router.shared_gate.to(hidden.dtype))).float()


# mechanism name (RoutingConfig.mechanism) -> its math; families name the one they route with
MECHANISMS: dict[str, Callable[[torch.Tensor, RouterWeights, RoutingConfig, torch.Generator | None], Rule]] = {
    "softmax_topk": _softmax_top_k,
    "softmax_grouped_topk": _softmax_grouped_top_k,
    "sigmoid_grouped_topk": _sigmoid_grouped_top_k,
    "softmax_biased_topk": _softmax_biased_top_k,
    "sigmoid_topk": _sigmoid_top_k,
    "logit_topk_softmax": _logit_top_k_softmax,
    "logit_topk_sigmoid": _logit_top_k_sigmoid,
    "switch_top1": _switch_top_1,
}
