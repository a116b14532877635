"""Desired state in, actions out: the controller's changes as a pure function of what it observes.

In the shape of Ray Serve's control loop (`serve/_private/controller.py`): a request or a policy
states what the deployment should look like (`WorkerCount`, `ExpertReplicas`, `Placement`), the
controller takes a snapshot of what it has (`Observed`), `compute_actions` says what to do, and the
controller's applier does it in one fixed order that keeps requests whole:

    clear replica shares -> start new workers and wait until they registered -> load experts
    -> remove workers -> unload experts -> send the new replica shares

so every expert keeps a replica at every moment. Nothing here calls Ray or gRPC.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from moe_serve.cluster.placement import ExpertKey, plan_placement

Shares = dict[ExpertKey, dict[str, float]]  # per expert, the share of its rows each worker id takes


@dataclass(frozen=True)
class PlacementShape:
    """What placement needs of the model: its MoE layers and experts placed per layer (shared included).

    Passed in rather than read from the checkpoint here: reading it imports torch, which would
    add two seconds to the controller's start and so to every stack's (the controller computes nothing).
    """

    moe_layers: tuple[int, ...]
    num_placed_experts: int
    # the router's expert groups (DeepSeek's n_group), which node-aware rebalancing keeps on one node
    # where balance allows; None: no groups
    expert_groups: int | None = None
    # shared experts, the last ids placed: in no group; rebalancing puts one on every worker
    num_shared: int = 0


@dataclass(frozen=True)
class WorkerView:
    """A managed worker as the controller sees it."""

    experts: frozenset[ExpertKey]
    # set for replicas added by scale_expert: removed first when that expert scales down
    dedicated_to: frozenset[ExpertKey] | None = None


@dataclass(frozen=True)
class Observed:
    workers: Mapping[str, WorkerView]  # by worker id, in the order they were started
    has_shares: bool = False  # the router follows replica shares (set by a rebalance)


@dataclass(frozen=True)
class WorkerCount:
    """`workers` workers on the standard placement plan (a fresh set: new ones start, old ones go)."""

    workers: int


@dataclass(frozen=True)
class ExpertReplicas:
    """Exactly `replicas` replicas of the expert whose keys (one per layer) are `keys`."""

    keys: frozenset[ExpertKey]
    replicas: int


@dataclass(frozen=True)
class Placement:
    """The experts each existing worker holds, and the router's replica shares (a rebalance's plan)."""

    experts: Mapping[str, set[ExpertKey]]
    shares: Shares


Desired = WorkerCount | ExpertReplicas | Placement


@dataclass
class Actions:
    """What to change, applied in the order of the fields."""

    clear_shares: bool = False
    # new workers: the experts each holds, and the expert it is dedicated to (scale_expert)
    add: list[tuple[frozenset[ExpertKey], frozenset[ExpertKey] | None]] = field(default_factory=list)
    load: dict[str, set[ExpertKey]] = field(default_factory=dict)
    remove: list[str] = field(default_factory=list)
    unload: dict[str, set[ExpertKey]] = field(default_factory=dict)
    shares: Shares | None = None  # None: leave the router's shares as they are


def replica_count(workers: Mapping[str, WorkerView], keys: frozenset[ExpertKey]) -> int:
    """Workers holding every key of `keys`."""
    return sum(1 for view in workers.values() if keys <= view.experts)


def initial_actions(shape: PlacementShape, workers: int) -> Actions:
    """A first set of `workers` workers on the standard placement plan."""
    plan = plan_placement(shape.moe_layers, shape.num_placed_experts, workers)
    return Actions(add=[(frozenset(assignment.experts), None) for assignment in plan])


def compute_actions(desired: Desired, observed: Observed, shape: PlacementShape) -> Actions:
    """The actions that take the deployment from `observed` to `desired`."""
    if isinstance(desired, WorkerCount):
        # shares name the old workers; the new ones are chosen by load until a rebalance
        actions = initial_actions(shape, desired.workers)
        actions.clear_shares, actions.remove = observed.has_shares, list(observed.workers)
        return actions
    if isinstance(desired, ExpertReplicas):
        return _expert_replica_actions(desired, observed)
    return Actions(
        load={w: missing for w, keys in desired.experts.items() if (missing := keys - observed.workers[w].experts)},
        unload={w: extra for w, keys in desired.experts.items() if (extra := observed.workers[w].experts - keys)},
        shares=desired.shares,
    )


def _expert_replica_actions(desired: ExpertReplicas, observed: Observed) -> Actions:
    """New dedicated replicas when there are too few; when too many, dedicated replicas go first,
    then workers holding other experts too unload this one."""
    keys, workers = desired.keys, observed.workers
    # a replica added or removed here has no planned share: replicas are chosen by load again
    actions = Actions(clear_shares=observed.has_shares)
    current = replica_count(workers, keys)
    actions.add = [(keys, keys)] * max(0, desired.replicas - current)
    excess = current - desired.replicas
    actions.remove = [w for w, view in workers.items() if view.dedicated_to == keys][: max(0, excess)]
    excess -= len(actions.remove)
    for worker_id, view in workers.items():
        if excess <= 0:
            break
        if worker_id not in actions.remove and keys <= view.experts and len(view.experts) > len(keys):
            actions.unload[worker_id] = set(keys)
            excess -= 1
    return actions
