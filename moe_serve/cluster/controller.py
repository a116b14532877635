"""The deployment controller: a named Ray actor that owns the expert-worker actors of one stack.

`moe-serve up` creates it; `moe-serve scale` and `moe-serve status`, from any process connected to
the same Ray cluster, find it by name and act through it. Every change keeps requests whole:
- new workers are started and registered before old ones are asked to leave;
- a leaving worker (or an expert leaving a worker) first stops being announced in the registry,
  then finishes its in-flight rows, then goes; routers that still send it rows get UNAVAILABLE
  and retry on another replica.
Workers register themselves (router-hosted registry or Redis) and are restarted by Ray if their
process dies (`max_restarts`), under the same worker id. They do not share the controller's fate:
they are detached actors named after it, which a restarted controller adopts, and which leave by
themselves once the controller is gone for good.

Every change is one pass of a control loop in Ray Serve's shape: the desired state (a worker count,
an expert's replica count, a rebalance's placement) and a snapshot of the managed workers go into
`reconcile.compute_actions`, a pure function, and `_apply` carries the actions out. The policies
(`policies/`) decide the desired state from measurements. The worker actor class comes from the
caller (`worker_actor`): the cluster core knows no service package.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import ray

from moe_serve.cluster.placement import ExpertKey
from moe_serve.cluster.policies.autoscale import AutoscalePolicy, decide_worker_count
from moe_serve.cluster.policies.rebalance import decide_rebalance
from moe_serve.cluster.reconcile import (
    Actions,
    Desired,
    ExpertReplicas,
    Observed,
    PlacementShape,
    Shares,
    WorkerCount,
    WorkerView,
    compute_actions,
    initial_actions,
    replica_count,
)
from moe_serve.config import WorkerSettings, settings_json
from moe_serve.protos import moe_serve_pb2 as moe_pb2
from moe_serve.protos import moe_serve_pb2_grpc as moe_grpc
from moe_serve.runtime.grpc_utils import QUICK_RECONNECT
from moe_serve.runtime.security import ClusterCredentials, open_channel
from moe_serve.worker_record import WorkerRecord

logger = logging.getLogger(__name__)
NAMESPACE = "moe-serve"
REGISTRATION_TIMEOUT_S = 120.0
# one look at the registry while waiting for new workers: the wait polls again after it, and a stop
# (stop_all) is noticed between looks, not after a 10 s call to a router that has gone
REGISTRY_POLL_TIMEOUT_S = 2.0


def controller_name(model_name: str, router_address: str) -> str:
    return f"{model_name}@{router_address}"


def format_keys(keys: set[ExpertKey] | list[ExpertKey]) -> str:
    """Keys as a worker's --experts value: "layer:expert,..."."""
    return ",".join(f"{key.layer}:{key.expert}" for key in sorted(keys))


@dataclass
class ManagedWorker:
    handle: Any
    experts: set[ExpertKey]
    # set for replicas added by scale_expert: removed first when that expert scales down
    dedicated_to: frozenset[ExpertKey] | None = None


class DeploymentController:
    """Owns the worker actors; all mutating methods hold one lock, so changes never interleave."""

    def __init__(
        self,
        model_name: str,
        checkpoint: str,
        shape: PlacementShape,
        worker_settings: WorkerSettings,
        router_address: str,
        num_gpus: float = 0.0,
        num_cpus: float = 0.0,
        actor_env: dict[str, str] | None = None,
        policies: dict[str, Any] | None = None,
        *,
        worker_actor: type,
    ) -> None:
        """`policies`: run_policies' keyword arguments, started once the workers are up (start), and
        again by a controller Ray restarted, which would otherwise come back without them.
        `worker_actor`: the expert worker's actor class (expert_service.actor.ExpertWorkerActor),
        constructed with (worker settings, controller name, namespace, controller actor id)."""
        self._worker_actor = ray.remote(worker_actor)
        self.model_name, self.checkpoint = model_name, Path(checkpoint)
        self._policies = dict(policies) if policies else None
        self._policies_running = False
        self.shape = shape
        self.worker_settings, self.router_address = worker_settings, router_address
        self.num_gpus, self.num_cpus = num_gpus, num_cpus
        # worker processes start from the raylet's environment, not the launcher's: hand them the
        # OpenTelemetry settings (collector endpoint, export intervals) the stack was started with,
        # and the allocator's arena limit
        self._actor_env = dict(actor_env or {})
        self._stubs: dict[str, moe_grpc.ExpertWorkerStub] = {}
        self._workers: dict[str, ManagedWorker] = {}
        self._next_index = 0
        self._lock = threading.RLock()
        # the workers' own credentials (cluster secret, internal TLS): the controller calls the same services
        self._credentials = ClusterCredentials.from_settings(worker_settings)
        self._channel = open_channel(router_address, QUICK_RECONNECT, self._credentials)
        self._router = moe_grpc.RouterStub(self._channel)
        self._last_load: dict[ExpertKey, int] = {}
        # the replica shares last sent to the router (rebalance); cleared when workers change otherwise
        self._shares: Shares = {}
        # set by stop_all: ends the policy loop, and abandons a change still waiting for new workers
        self._policy_stop = threading.Event()
        self.events: list[str] = []
        # workers are detached actors named after this controller, so they outlive its process: a
        # controller Ray restarts (max_restarts) finds them by name and adopts them; serving never stops
        context = ray.get_runtime_context()
        self._name, self._actor_id = context.get_actor_name() or "", context.get_actor_id() or ""
        with warnings.catch_warnings():
            # Ray's property reads its own deprecated `actor_id`, which printed a RayDeprecationWarning
            # on every `up`: not something an operator can act on
            warnings.simplefilter("ignore", DeprecationWarning)
            reconstructed = context.was_current_actor_reconstructed
        if reconstructed:
            self._adopt_workers()
            if self._policies:
                self.run_policies(**self._policies)
        elif self._name:
            self._remove_predecessors_workers()

    # ------------------------------------------------------------------ queries

    def records(self) -> list[str]:
        """Registry records (JSON) of the managed workers, with their live load."""
        managed = set(self._workers)
        return [r.to_json() for r in self._registered() if r.worker_id in managed]

    def worker_pids(self) -> dict[str, int]:
        """Process id of each worker actor (for resource measurements)."""
        ids = list(self._workers)
        return dict(zip(ids, ray.get([self._workers[w].handle.pid.remote() for w in ids]), strict=True))

    def status(self) -> dict[str, Any]:
        records = [WorkerRecord.from_json(text) for text in self.records()]
        replicas: dict[str, int] = {}
        for record in records:
            for key in record.experts:
                replicas[f"{key.layer}:{key.expert}"] = replicas.get(f"{key.layer}:{key.expert}", 0) + 1
        return {
            "model": self.model_name,
            "router": self.router_address,
            "workers": [r.to_json() for r in records],
            "replicas": replicas,
            "events": self.events[-20:],
            "policies": self._policies if self._policies_running else None,
        }

    # ------------------------------------------------------------------ scaling

    def start(self, workers: int) -> list[str]:
        """Start `workers` workers with the standard placement plan; return their records."""
        with self._lock:
            self._apply(initial_actions(self.shape, workers))
        if self._policies and not self._policies_running:
            self.run_policies(**self._policies)
        return self.records()

    def scale_workers(self, workers: int) -> list[str]:
        """Re-place all experts over `workers` workers: new ones first, then the old ones drain and go."""
        if workers < 1:
            raise ValueError("need at least one worker")
        with self._lock:
            self._reconcile(WorkerCount(workers))
            self._event(f"scaled to {workers} workers")
            return self.records()

    def scale_expert(self, expert: int, replicas: int, layer: int | None = None) -> list[str]:
        """Give expert `expert` (of `layer`, or of every MoE layer) exactly `replicas` replicas."""
        if replicas < 1:
            raise ValueError("an expert needs at least one replica")
        layers = [layer] if layer is not None else list(self.shape.moe_layers)
        if not 0 <= expert < self.shape.num_placed_experts or any(lay not in self.shape.moe_layers for lay in layers):
            raise ValueError(f"no expert {expert} in layer(s) {layers}")
        keys = frozenset(ExpertKey(lay, expert) for lay in layers)
        with self._lock:
            self._reconcile(ExpertReplicas(keys, replicas))
            count = replica_count(self._observed().workers, keys)
            self._event(f"expert {expert} (layers {layers}) at {count} replicas")
            return self.records()

    # ------------------------------------------------------------------ balancing

    def rebalance(
        self, slots_per_worker: int | None = None, min_gain: float = 0.15, num_groups: int | None = None
    ) -> dict[str, Any]:
        """One node-aware placement step per MoE layer over the load measured since the previous call
        (policies.rebalance.decide_rebalance: nodes are the workers' Ray node ids, each worker one
        GPU); applied only when it lowers the max/mean worker load by `min_gain` (hysteresis). The
        plan's replica shares then go to the router, which splits each expert's rows by them."""
        with self._lock:
            loads = self._window_load()
            experts = {w: set(managed.experts) for w, managed in self._workers.items()}
            enough = len(experts) >= 2 and sum(loads.values()) > 0  # else decide_rebalance keeps all as is
            node_of = {r.worker_id: r.node_id for r in self._registered()} if enough else {}
            decision = decide_rebalance(
                loads, experts, node_of, self._shares, self.shape, slots_per_worker, min_gain, num_groups
            )
            if decision.target is not None:
                self._reconcile(decision.target)
                self._event(f"rebalanced: {decision.report['layers']}")
            return decision.report

    def _set_shares(self, shares: Shares) -> None:
        """The router's replica shares (an empty table: replicas chosen by load again)."""
        self._shares = shares
        message = moe_pb2.ReplicaShares(
            shares=[
                moe_pb2.ReplicaShare(
                    expert=moe_pb2.ExpertKey(layer=key.layer, expert=key.expert), worker_id=worker_id, share=share
                )
                for key, by_worker in sorted(shares.items())
                for worker_id, share in sorted(by_worker.items())
            ]
        )
        self._router.SetReplicaShares(message, timeout=10)

    def run_policies(
        self, rebalance_interval_s: float = 0.0, autoscale: dict[str, Any] | None = None, check_interval_s: float = 5.0
    ) -> None:
        """Start the background loop: periodic rebalancing and/or autoscaling (until stop_all)."""
        policy = AutoscalePolicy(**autoscale) if autoscale else None
        self._policies_running = True
        threading.Thread(
            target=self._policy_loop,
            args=(rebalance_interval_s, policy, check_interval_s),
            name="controller-policies",
            daemon=True,
        ).start()

    def _policy_loop(self, rebalance_interval_s: float, policy: AutoscalePolicy | None, check_s: float) -> None:
        last_rebalance = time.monotonic()
        while not self._policy_stop.wait(check_s):
            try:
                if rebalance_interval_s and time.monotonic() - last_rebalance >= rebalance_interval_s:
                    self.rebalance()
                    last_rebalance = time.monotonic()
                if policy is not None:
                    self._autoscale(policy)
            except Exception:
                if not self._policy_stop.is_set():  # a change stop_all abandoned is no failure
                    logger.exception("controller policy step failed; will retry")

    def _autoscale(self, policy: AutoscalePolicy) -> None:
        decision = decide_worker_count(policy, [WorkerRecord.from_json(text) for text in self.records()])
        if decision is None or decision.wanted == decision.current:
            return
        if decision.wanted > decision.current and self.num_gpus:
            # tell Ray's cluster autoscaler about the capacity we are about to ask for
            from ray.autoscaler.sdk import request_resources

            request_resources(bundles=[{"GPU": self.num_gpus}] * decision.wanted)
        self._event(
            f"autoscale: {decision.current} -> {decision.wanted} workers "
            f"(queued rows/replica {decision.queued_rows_per_replica:.0f})"
        )
        self.scale_workers(decision.wanted)

    # ------------------------------------------------------------------ teardown

    def stop_all(self, grace_s: float = 5.0) -> None:
        self._policy_stop.set()
        with self._lock:
            for worker_id in list(self._workers):
                self._remove_worker(worker_id, grace_s)
        self._channel.close()

    # ------------------------------------------------------------------ reconciling

    def _observed(self) -> Observed:
        workers = {w: WorkerView(frozenset(m.experts), m.dedicated_to) for w, m in self._workers.items()}
        return Observed(workers, has_shares=bool(self._shares))

    def _reconcile(self, desired: Desired) -> None:
        self._apply(compute_actions(desired, self._observed(), self.shape))

    def _apply(self, actions: Actions) -> None:
        """Carry out `actions` in the order that keeps every expert served: new workers register
        before anything leaves, loads come before unloads."""
        if actions.clear_shares:
            self._set_shares({})
        added = [self._add_worker(set(experts), dedicated_to) for experts, dedicated_to in actions.add]
        if added:
            self._await_registered(set(added))
        for worker_id, keys in actions.load.items():
            self._load(worker_id, keys)
        for worker_id in actions.remove:
            self._remove_worker(worker_id)
        for worker_id, keys in actions.unload.items():
            self._unload(worker_id, keys)
        if actions.shares is not None:
            self._set_shares(actions.shares)

    # ------------------------------------------------------------------ internals

    def _worker_actor_name(self, worker_id: str) -> str:
        return worker_actor_name(self._name, worker_id)

    def _named_workers(self) -> list[str]:
        """Worker ids of the live worker actors named after this controller."""
        return named_workers(self._name)

    def _remove_predecessors_workers(self) -> None:
        """A new controller of the same name (its stack restarted within the seconds its old workers
        take to notice their controller is gone): their names are needed, their experts re-placed."""
        for worker_id in self._named_workers():
            logger.warning("controller: removing worker %s of a previous controller of this stack", worker_id)
            with contextlib.suppress(ValueError):
                ray.kill(ray.get_actor(self._worker_actor_name(worker_id), namespace=NAMESPACE), no_restart=True)

    def _adopt_workers(self) -> None:
        """After a restart: take over the live workers this controller had started (its
        replica-per-expert dedications and running policies are not kept)."""
        for worker_id in self._named_workers():
            try:
                handle = ray.get_actor(self._worker_actor_name(worker_id), namespace=NAMESPACE)
                # a worker Ray is restarting itself answers once its weights are loaded
                record = WorkerRecord.from_json(ray.get(handle.record_json.remote(), timeout=REGISTRATION_TIMEOUT_S))
            except Exception as error:  # gone meanwhile, or never came back: nothing to adopt
                logger.warning("controller restart: worker %s not adopted (%s)", worker_id, error)
                continue
            self._workers[worker_id] = ManagedWorker(handle, set(record.experts))
            self._next_index = max(self._next_index, int(worker_id.rpartition("-w")[2]) + 1)
        self._event(f"restarted; adopted live workers {sorted(self._workers)}")

    def _add_worker(self, experts: set[ExpertKey], dedicated_to: frozenset[ExpertKey] | None = None) -> str:
        worker_id = f"{self.model_name}-w{self._next_index}"
        self._next_index += 1
        # named and detached when this controller is named (always, as started by the launcher): the
        # worker then survives the controller's death (see __init__), and leaves by itself when the
        # controller is gone for good (ExpertWorkerActor watches it by name)
        lifetime = {"name": self._worker_actor_name(worker_id), "namespace": NAMESPACE, "lifetime": "detached"}
        handle = self._worker_actor.options(
            num_gpus=self.num_gpus,
            num_cpus=self.num_cpus,
            max_concurrency=4,
            max_restarts=-1,
            runtime_env={"env_vars": self._actor_env} if self._actor_env else None,
            **(lifetime if self._name else {}),
        ).remote(
            # the actor's settings as JSON: the secret included (see launcher.worker_settings), what the
            # launcher left unset left out (the actor's node environment gives it)
            settings_json(
                self.worker_settings,
                secrets=True,
                only_set=True,
                checkpoint=str(self.checkpoint),
                experts=format_keys(experts),
                worker_id=worker_id,
                port=0,
            ),
            self._name or None,
            NAMESPACE,
            self._actor_id,
        )
        self._workers[worker_id] = ManagedWorker(handle, experts, dedicated_to)
        return worker_id

    def _remove_worker(self, worker_id: str, grace_s: float = 5.0) -> None:
        managed = self._workers.pop(worker_id)
        try:
            ray.get(managed.handle.stop.remote(grace_s), timeout=grace_s + 30)  # deregister, drain, stop
        except Exception as error:
            logger.warning("worker %s did not stop cleanly (%s); killing it", worker_id, error)
        ray.kill(managed.handle, no_restart=True)

    def _unload(self, worker_id: str, keys: set[ExpertKey]) -> None:
        self._worker_stub(worker_id).UnloadExperts(_expert_set(keys), timeout=60)
        self._workers[worker_id].experts -= keys

    def _load(self, worker_id: str, keys: set[ExpertKey]) -> None:
        self._worker_stub(worker_id).LoadExperts(_expert_set(keys), timeout=120)
        self._workers[worker_id].experts |= keys

    def _worker_stub(self, worker_id: str) -> moe_grpc.ExpertWorkerStub:
        address = next(r.address for r in self._registered() if r.worker_id == worker_id)
        if address not in self._stubs:
            self._stubs[address] = moe_grpc.ExpertWorkerStub(open_channel(address, [], self._credentials))
        return self._stubs[address]

    def _registered(self, timeout_s: float = 10.0) -> list[WorkerRecord]:
        # the router may still be starting (launcher.launch_stack starts it beside the workers)
        reply = self._router.ListWorkers(moe_pb2.ListWorkersRequest(), timeout=timeout_s, wait_for_ready=True)
        return [WorkerRecord.from_proto(info) for info in reply.workers]

    def _registered_ids(self) -> set[str]:
        """Ids of the registered workers; none while the router is not up yet (launcher.launch_stack
        starts it beside the workers, and a slow machine may take longer than one call's timeout)
        or gone. One look waits at most REGISTRY_POLL_TIMEOUT_S: the caller looks again, and notices
        a stop in between (a router embedded in the gateway is gone before stop_all runs)."""
        try:
            return {record.worker_id for record in self._registered(REGISTRY_POLL_TIMEOUT_S)}
        except grpc.RpcError as error:
            if error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return set()
            raise

    def _await_registered(self, worker_ids: set[str]) -> None:
        """Wait for new workers to register; on timeout remove them, so a failed change leaves the
        placement as it was (not a partial one that completes later, unannounced)."""
        deadline = time.monotonic() + REGISTRATION_TIMEOUT_S
        while not worker_ids <= self._registered_ids():
            if self._policy_stop.is_set():
                # stop_all waits for this lock: a change still starting workers (the autoscaler's
                # above all) is abandoned rather than finished only to be torn down, which would hold
                # the stop for as long as new workers take to import torch and load their experts
                for worker_id in worker_ids & set(self._workers):
                    ray.kill(self._workers.pop(worker_id).handle, no_restart=True)
                raise RuntimeError(f"stopping: workers {sorted(worker_ids)} were removed before they registered")
            if time.monotonic() > deadline:
                for worker_id in worker_ids & set(self._workers):
                    ray.kill(self._workers.pop(worker_id).handle, no_restart=True)
                raise TimeoutError(
                    f"workers {sorted(worker_ids)} did not register within {REGISTRATION_TIMEOUT_S:.0f} s and "
                    f"were removed; the placement is unchanged. Does the Ray cluster have room for them "
                    f"(each asks for {self.num_cpus:g} CPU, {self.num_gpus:g} GPU; `ray status` shows what is free)?"
                )
            time.sleep(0.1)

    def _window_load(self) -> dict[ExpertKey, int]:
        reply = self._router.GetExpertLoad(moe_pb2.ExpertLoadRequest(), timeout=10)
        totals = {ExpertKey(e.layer, e.expert): e.rows for e in reply.experts}
        window = {key: rows - self._last_load.get(key, 0) for key, rows in totals.items()}
        self._last_load = totals
        return window

    def _event(self, text: str) -> None:
        logger.info("controller: %s", text)
        self.events.append(f"{time.strftime('%H:%M:%S')} {text}")


def worker_actor_name(controller: str, worker_id: str) -> str:
    """The Ray actor name of a worker the controller named `controller` started."""
    return f"{controller}/{worker_id}"


def named_workers(controller: str) -> list[str]:
    """Worker ids of the live worker actors named after the controller named `controller`."""
    prefix = worker_actor_name(controller, "")
    return [
        entry["name"].removeprefix(prefix)
        for entry in ray.util.list_named_actors(all_namespaces=True)
        if entry["namespace"] == NAMESPACE and entry["name"].startswith(prefix)
    ]


def _expert_set(keys: set[ExpertKey]) -> moe_pb2.ExpertSet:
    return moe_pb2.ExpertSet(experts=[moe_pb2.ExpertKey(layer=k.layer, expert=k.expert) for k in sorted(keys)])
