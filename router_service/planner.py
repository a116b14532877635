"""Routing decisions: gate a batch, apply the capacity the gateway asked for, group rows per worker.

Protocol-neutral: tensors in, tensors and plain objects out; the servicer does the protobuf.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from moe_serve.checkpoint import Checkpoint, RouterWeights
from moe_serve.cluster.placement import ExpertKey
from moe_serve.layer.capacity import CapacityOutcome, OverflowRule, apply_capacity, combine_weights
from moe_serve.layer.dispatch import ExpertGroups, group_by_expert, token_indices
from moe_serve.layer.gating import GatingResult, compute_gating, copy_keeping_alignment
from moe_serve.model_spec import MoEModelSpec
from moe_serve.runtime.errors import ExpertUnavailable, InvalidInput
from moe_serve.worker_record import WorkerRecord
from router_service.registry import Registry


@dataclass(frozen=True)
class RoutingDecision:
    """Gating of one dispatch batch after the capacity rule.

    Each token has `slots_per_token` = k + S slots: its k routed slots, then S (0 or 1) for the
    shared expert (expert id E, never subject to capacity).
    outcome: the capacity rule's result for the routed slots.
    expert_weights: [T, k] float32 combine weights, 0 where a slot was dropped.
    groups: kept slots (routed and shared) grouped by expert; positions index [T * slots_per_token].
    """

    layer: int
    gating: GatingResult
    outcome: CapacityOutcome
    expert_weights: torch.Tensor
    groups: ExpertGroups
    slots_per_token: int

    def overflow_counts(self, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[E] dropped and [E] rerouted slots, each attributed to the expert that was over capacity."""
        original = self.outcome.original_ids
        return (
            torch.bincount(original[self.outcome.dropped], minlength=num_experts),
            torch.bincount(original[self.outcome.rerouted], minlength=num_experts),
        )


class RoutingPlanner:
    """Holds the router weights of every MoE layer and makes routing decisions."""

    def __init__(self, checkpoint: Checkpoint, dtype: torch.dtype, noise_std: float = 0.0, noise_seed: int = 0) -> None:
        self.spec: MoEModelSpec = checkpoint.spec
        self.dtype = dtype
        self.routing = replace(self.spec.routing, noise_std=noise_std)
        self.routers = {layer: _owned(checkpoint.router_weights(layer)) for layer in self.spec.moe_layers}
        checkpoint.close()
        # noisy gating draws from one seeded generator, so a run is reproducible request by request
        self._noise = torch.Generator().manual_seed(noise_seed)

    def decide(
        self, hidden_states: torch.Tensor, layer: int, expert_capacity: int, overflow: OverflowRule = "drop"
    ) -> RoutingDecision:
        """Gate `hidden_states` [T, d] for `layer`; at most `expert_capacity` rows per expert (0 = no limit)."""
        router = self.routers.get(layer)
        spec = self.spec
        if router is None:
            raise InvalidInput(f"layer {layer} has no MoE block; MoE layers are {list(spec.moe_layers)}")
        if expert_capacity < 0:
            raise InvalidInput(f"expert_capacity must be >= 0, got {expert_capacity}")
        gating = compute_gating(hidden_states, router, self.routing, spec.num_shared_slots, self._noise)
        outcome = apply_capacity(gating.expert_ids, gating.selection_scores, expert_capacity, overflow)
        weights = combine_weights(outcome, gating.expert_weights, gating.weight_scores, overflow)
        num_tokens, shared = hidden_states.shape[0], spec.num_shared_slots
        slot_ids, slot_kept = outcome.expert_ids, outcome.kept
        if shared:  # the shared expert's slot follows the routed ones (at T=1 every tensor op counts)
            slot_ids = torch.cat([slot_ids, torch.full((num_tokens, shared), spec.shared_expert_id)], dim=1)
            slot_kept = torch.cat([slot_kept, torch.ones(num_tokens, shared, dtype=torch.bool)], dim=1)
        return RoutingDecision(
            layer=layer,
            gating=gating,
            outcome=outcome,
            expert_weights=weights,
            groups=group_by_expert(slot_ids, slot_kept, spec.num_placed_experts),
            slots_per_token=spec.top_k + shared,
        )


def _owned(router: RouterWeights) -> RouterWeights:
    """Copies that do not keep the checkpoint's memory map alive (aligned as the map was)."""
    return RouterWeights(**{name: None if t is None else copy_keeping_alignment(t) for name, t in vars(router).items()})


@dataclass(frozen=True)
class WorkerBatch:
    """Rows for one worker: consecutive segments, one per expert."""

    worker: WorkerRecord
    experts: tuple[int, ...]
    counts: tuple[int, ...]
    positions: torch.Tensor  # [n] int64 flat slot positions

    @property
    def num_rows(self) -> int:
        return int(self.positions.numel())


# outstanding work of a replica; math.inf for one that just failed (avoided while another exists)
ReplicaLoad = Callable[[WorkerRecord], float]
# the placement planner's share of an expert's rows per worker id (an empty mapping: no shares)
ReplicaShares = Callable[[ExpertKey], Mapping[str, float]]
RESIDENT_SLACK_ROWS = 256


def choose_replica(
    replicas: tuple[WorkerRecord, ...],
    load: ReplicaLoad,
    rng: random.Random,
    prefer: Callable[[WorkerRecord], bool] | None = None,
) -> WorkerRecord:
    """Power of two choices among the healthy replicas: of two random ones, the less loaded, except
    that one `prefer`red (its expert resident on an offloading worker) wins while its load is within
    RESIDENT_SLACK_ROWS of the other's: a miss costs a load, a few queued rows cost less."""
    healthy = [r for r in replicas if load(r) != math.inf] or list(replicas)
    if len(healthy) == 1:
        return healthy[0]
    first, second = rng.sample(healthy, 2)
    if prefer is not None and prefer(first) != prefer(second):
        preferred, other = (first, second) if prefer(first) else (second, first)
        return preferred if load(preferred) <= load(other) + RESIDENT_SLACK_ROWS else other
    return first if load(first) <= load(second) else second


def assign_workers(
    layer: int,
    expert_segments: dict[int, torch.Tensor],
    registry: Registry,
    load: ReplicaLoad,
    rng: random.Random,
    excluded: frozenset[str] = frozenset(),
    split_min_rows: int = 0,
    resident: Callable[[WorkerRecord, ExpertKey], bool] | None = None,
    replica_shares: ReplicaShares | None = None,
    follow_tokens: frozenset[int] = frozenset(),
    slots_per_token: int = 1,
) -> list[WorkerBatch]:
    """Pick replicas for each expert and bundle each worker's experts into one batch.

    expert_segments: expert id -> [n_e] flat positions of its rows.
    excluded: worker ids that just failed, not to be tried again for these rows.
    split_min_rows: an expert with several replicas and at least twice this many rows is split
        over up to rows // split_min_rows of its least-loaded replicas (0: never split), so a hot
        expert's rows are computed in parallel.
    resident: whether a replica holds the expert in its device tier (offloading workers), preferred.
    replica_shares: the placement planner's share of an expert's rows per worker id; an expert that
        has shares is split over its healthy replicas in those proportions (split_rows_by_shares),
        overriding the choices above; experts without shares keep them.
    follow_tokens: experts (the shared ones) placed after the others, each row on a replica on its
        token's main node (the node with most of the token's other rows) where one is, by the rules
        above among that node's replicas; `slots_per_token` maps positions to tokens.
    Raises ExpertUnavailable naming the expert when no live replica is left.
    """
    chosen: dict[str, tuple[WorkerRecord, list[int], list[torch.Tensor]]] = {}
    place = functools.partial(_place_expert, chosen, layer, load, rng, split_min_rows, resident, replica_shares)
    following = sorted(e for e in expert_segments if e in follow_tokens)
    for expert in sorted(e for e in expert_segments if e not in follow_tokens):
        place(expert, expert_segments[expert], _live_replicas(registry, layer, expert, excluded))
    if following:
        num_tokens = max(int(p.max()) for p in expert_segments.values()) // slots_per_token + 1
        nodes, main_node = _main_node_of_tokens(chosen.values(), slots_per_token, num_tokens)
    for expert in following:
        rest, replicas = expert_segments[expert], _live_replicas(registry, layer, expert, excluded)
        healthy = [r for r in replicas if load(r) != math.inf]
        if len({r.node_id for r in healthy}) <= 1:  # no choice of node: the rules above, rows unsplit
            place(expert, rest, replicas)
            continue
        for index, node in enumerate(nodes):
            local = tuple(r for r in healthy if r.node_id == node)
            here = main_node[torch.div(rest, slots_per_token, rounding_mode="floor")] == index
            if local and here.any():
                place(expert, rest[here], local)
                rest = rest[~here]
        if rest.numel():  # tokens whose main node holds no replica of it
            place(expert, rest, replicas)
    return [
        WorkerBatch(
            worker=worker,
            experts=tuple(experts),
            counts=tuple(int(p.numel()) for p in pieces),
            positions=torch.cat(pieces) if len(pieces) > 1 else pieces[0],
        )
        for worker, experts, pieces in chosen.values()
    ]


def _live_replicas(registry: Registry, layer: int, expert: int, excluded: frozenset[str]) -> tuple[WorkerRecord, ...]:
    replicas = tuple(r for r in registry.replicas(ExpertKey(layer, expert)) if r.worker_id not in excluded)
    if not replicas:
        raise ExpertUnavailable(
            f"expert {expert} of layer {layer} has no live replica; retry once a worker serving it is back"
        )
    return replicas


def _main_node_of_tokens(
    chosen: Iterable[tuple[WorkerRecord, list[int], list[torch.Tensor]]], slots_per_token: int, num_tokens: int
) -> tuple[list[str], torch.Tensor]:
    """(node ids, [num_tokens] index into them of the node with most of each token's rows placed
    so far; ties and tokens without rows: the first node)."""
    entries = [(worker.node_id, torch.cat(pieces)) for worker, _, pieces in chosen]
    nodes = sorted({node for node, _ in entries})
    if not nodes:
        return [], torch.zeros(num_tokens, dtype=torch.int64)
    tokens = torch.cat([torch.div(p, slots_per_token, rounding_mode="floor") for _, p in entries])
    node_index = torch.cat([torch.full((p.numel(),), nodes.index(n), dtype=torch.int64) for n, p in entries])
    counts = torch.bincount(tokens * len(nodes) + node_index, minlength=num_tokens * len(nodes))
    return nodes, counts.view(num_tokens, len(nodes)).argmax(dim=1)


def _place_expert(
    chosen: dict[str, tuple[WorkerRecord, list[int], list[torch.Tensor]]],
    layer: int,
    load: ReplicaLoad,
    rng: random.Random,
    split_min_rows: int,
    resident: Callable[[WorkerRecord, ExpertKey], bool] | None,
    replica_shares: ReplicaShares | None,
    expert: int,
    positions: torch.Tensor,
    replicas: tuple[WorkerRecord, ...],
) -> None:
    """Add `positions` of `expert` to the batches of the replicas (of `replicas`) that take them."""
    healthy = [r for r in replicas if load(r) != math.inf] or list(replicas)
    shares = replica_shares(ExpertKey(layer, expert)) if replica_shares is not None else {}
    # ordered by node: an expert's rows are in token order, so every expert split this way sends
    # its first tokens to the first node, and a token's rows tend to meet on one node
    weighted = sorted((r for r in healthy if shares.get(r.worker_id, 0.0) > 0), key=lambda r: (r.node_id, r.worker_id))
    if weighted:
        counts = split_rows_by_shares(positions.numel(), [shares[r.worker_id] for r in weighted], rng)
        targets, pieces = weighted, list(torch.split(positions, counts))
    else:
        parts = min(len(healthy), positions.numel() // split_min_rows) if split_min_rows else 1
        if parts <= 1:
            key = ExpertKey(layer, expert)
            prefer = (lambda worker, key=key: resident(worker, key)) if resident is not None else None
            targets, pieces = [choose_replica(replicas, load, rng, prefer)], [positions]
        else:
            targets = sorted(healthy, key=load)[:parts]
            pieces = list(torch.tensor_split(positions, parts))
    for worker, piece in zip(targets, pieces, strict=True):
        if not piece.numel():
            continue
        entry = chosen.setdefault(worker.worker_id, (worker, [], []))
        if entry[1] and entry[1][-1] == expert:  # a shared expert's rows from several nodes' tokens: one segment
            entry[2][-1] = torch.cat([entry[2][-1], piece])
        else:
            entry[1].append(expert)
            entry[2].append(piece)


def split_rows_by_shares(rows: int, shares: Sequence[float], rng: random.Random) -> list[int]:
    """Rows per replica for an expert's `rows` rows split in proportion to `shares` (renormalised
    over the replicas given, e.g. the healthy ones): floor(rows x share) each, and the rows left over
    by systematic sampling of the fractional parts (points u, u + 1, ... with u uniform in [0, 1) laid
    over their running sum), so each replica gets its floor or one more and its expected count is
    exactly rows x share, which is what the placement planner balanced for, even at one row per
    request. The counts always sum to `rows`."""
    total = sum(shares)
    if not shares or total <= 0 or min(shares) < 0:
        raise ValueError(f"replica shares must be non-negative with a positive sum, got {list(shares)}")
    exact = [rows * share / total for share in shares]
    counts = [math.floor(value) for value in exact]
    point, running = rng.random(), 0.0
    for index, (value, count) in enumerate(zip(exact, counts, strict=True)):
        running += value - count
        while point < running and sum(counts) < rows:
            counts[index] += 1
            point += 1.0
    if short := rows - sum(counts):  # the running sum fell a rounding error short of its whole number
        counts[max(range(len(counts)), key=lambda i: exact[i] - counts[i])] += short
    return counts


def cross_node_rows(batches: Sequence[WorkerBatch], slots_per_token: int) -> int:
    """Rows sent to a node other than the one that gets most of their token's rows: what crosses
    nodes if each token is sent once to its main node and fanned out there (ties: any one node)."""
    if not batches:
        return 0
    nodes = sorted({batch.worker.node_id for batch in batches})
    if len(nodes) == 1:
        return 0
    positions = torch.cat([batch.positions for batch in batches])
    node_of_row = torch.cat(
        [torch.full((batch.num_rows,), nodes.index(batch.worker.node_id), dtype=torch.int64) for batch in batches]
    )
    tokens = torch.div(positions, slots_per_token, rounding_mode="floor")
    per_token_node = torch.bincount(tokens * len(nodes) + node_of_row, minlength=(int(tokens.max()) + 1) * len(nodes))
    return int(positions.numel() - per_token_node.view(-1, len(nodes)).max(dim=1).values.sum())


def split_batch(batch: WorkerBatch, max_rows: int) -> list[WorkerBatch]:
    """`batch` as consecutive pieces of at most `max_rows` rows each (an expert's rows may span pieces).

    Keeps every message of the hop (rows out, outputs back) within the message-size limit: rows
    are independent, so the gateway places each piece's outputs by position whatever the split.
    """
    if batch.num_rows <= max_rows:
        return [batch]
    pieces: list[WorkerBatch] = []
    experts: list[int] = []
    counts: list[int] = []
    start = taken = 0  # piece start in batch.positions; rows already in the current piece
    for expert, count in zip(batch.experts, batch.counts, strict=True):
        while count:
            take = min(count, max_rows - taken)
            experts.append(expert)
            counts.append(take)
            taken += take
            count -= take
            if taken == max_rows:
                pieces.append(_piece(batch, experts, counts, start))
                start, taken, experts, counts = start + taken, 0, [], []
    if taken:
        pieces.append(_piece(batch, experts, counts, start))
    return pieces


def _piece(batch: WorkerBatch, experts: list[int], counts: list[int], start: int) -> WorkerBatch:
    return WorkerBatch(
        worker=batch.worker,
        experts=tuple(experts),
        counts=tuple(counts),
        positions=batch.positions[start : start + sum(counts)],
    )


def segments_of(groups: ExpertGroups) -> dict[int, torch.Tensor]:
    """Each active expert's positions (views): a slice per active expert, none for the idle ones."""
    segments, start = {}, 0
    for expert, count in enumerate(groups.counts.tolist()):  # one conversion, not two per expert
        if count:
            segments[expert] = groups.positions[start : start + count]
            start += count
    return segments


def gather_rows(hidden_states: torch.Tensor, positions: torch.Tensor, slots_per_token: int) -> torch.Tensor:
    """The hidden-state rows of the tokens owning `positions` (one copy, in position order)."""
    return hidden_states.index_select(0, token_indices(positions, slots_per_token))
