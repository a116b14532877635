"""Which experts come next: hints for workers that offload experts, so loads overlap with compute.

After gating layer L the router knows each token's experts at L; what it wants is a guess at the
experts of the next MoE layer, before that layer's request arrives. Two sources, combined:
- transitions: for requests that carry a `sequence_id` (the KServe/Triton sequence parameter;
  `RemoteMoE` sends one per forward pass), consecutive MoE layers of the same sequence are matched
  token by token, and counts[L][e, e'] grow by one for every token that used e at L and e' next;
- popularity: per layer, an exponentially decaying count of expert use (a prior for sequences
  with no history, and the whole guess for clients without a sequence id).
The guess is the experts that carry most of the expected next-layer mass, as many as the current
layer used. A wrong guess costs a load that is evicted first; workers never evict work for it.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass

import torch

from moe_serve.cluster.placement import ExpertKey

MAX_SEQUENCES = 4096  # sequences whose last layer is remembered (LRU)
POPULARITY_DECAY = 0.98  # per observed request
PRIOR_WEIGHT = 0.05  # how much popularity counts beside learnt transitions


@dataclass
class _LastLayer:
    layer: int
    usage: torch.Tensor  # [T, E] bool: which experts each token used


class ExpertForecast:
    def __init__(self, moe_layers: tuple[int, ...], num_experts: int) -> None:
        self.num_experts = num_experts
        self._next_layer = dict(itertools.pairwise(moe_layers))
        self._previous_layer = {after: before for before, after in self._next_layer.items()}
        self._transitions = {layer: torch.zeros(num_experts, num_experts) for layer in self._next_layer}
        self._popularity = {layer: torch.zeros(num_experts) for layer in moe_layers}
        self._sequences: OrderedDict[str, _LastLayer] = OrderedDict()
        self.learnt_pairs = 0  # token transitions counted so far

    def observe(self, sequence_id: str, layer: int, expert_ids: torch.Tensor) -> None:
        """Learn from one routed request: expert_ids [T, k] (ids >= E, e.g. dropped slots, are ignored)."""
        usage = self._usage(expert_ids)
        popularity = self._popularity.get(layer)
        if popularity is None:
            return
        popularity.mul_(POPULARITY_DECAY).add_(usage.sum(0).float())
        if not sequence_id:
            return
        last = self._sequences.pop(sequence_id, None)
        if last is not None and last.layer == self._previous_layer.get(layer) and last.usage.shape == usage.shape:
            # tokens are in the same order in consecutive layers of one forward pass
            self._transitions[last.layer].add_(last.usage.float().T @ usage.float())
            self.learnt_pairs += int(last.usage.sum()) * expert_ids.shape[1]
        if layer in self._next_layer:
            self._sequences[sequence_id] = _LastLayer(layer, usage)
            while len(self._sequences) > MAX_SEQUENCES:
                self._sequences.popitem(last=False)

    def predict(self, layer: int, expert_ids: torch.Tensor) -> list[ExpertKey]:
        """Experts of the next MoE layer the tokens routed as `expert_ids` at `layer` will likely use."""
        following = self._next_layer.get(layer)
        if following is None:
            return []
        usage = self._usage(expert_ids).float()
        counts = self._transitions[layer]
        rows = counts.sum(1, keepdim=True)
        learnt = torch.where(rows > 0, counts / rows.clamp(min=1), torch.zeros_like(counts))
        expected = usage.sum(0) @ learnt  # next-layer uses expected from what was learnt
        prior = self._popularity[following]
        if prior.sum() > 0:
            expected = expected + PRIOR_WEIGHT * usage.sum() * prior / prior.sum()
        wanted = int(torch.count_nonzero(usage.sum(0)))  # as many experts as this layer used
        ranked = torch.argsort(expected, descending=True, stable=True)[:wanted]
        return [ExpertKey(following, int(e)) for e in ranked if expected[e] > 0]

    def _usage(self, expert_ids: torch.Tensor) -> torch.Tensor:
        ids = expert_ids.long()
        valid = (ids >= 0) & (ids < self.num_experts)
        usage = torch.zeros(ids.shape[0], self.num_experts + 1, dtype=torch.bool)
        usage.scatter_(1, torch.where(valid, ids, self.num_experts), True)
        return usage[:, : self.num_experts]
