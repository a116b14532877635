"""The expert worker as a Ray actor: Ray places it (one per GPU with num_gpus=1), it serves gRPC.

The actor runs the same WorkerService as `moe-serve worker`, on an event loop of its own thread,
so gRPC traffic never waits on Ray's method-call machinery; Ray is used for placement and
lifetime only, never on the data path.

This module imports only what Ray needs to create the actor: whoever starts a stack (`moe-serve up`,
the bench, the tests) imports it to hand the class to the deployment controller, which never
computes, so torch and the worker's service modules are imported in the actor's own process, in
`__init__`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading

import ray

logger = logging.getLogger(__name__)


def restore_scheduling_priority() -> None:
    """Undo the niceness Ray gives its worker processes (15 by default).

    Ray lowers workers' priority to keep its own daemons responsive, but here the worker is the
    layer's compute: at niceness 15 it loses every scheduling contest against the gateway and
    router on a shared host. Needs the privilege to lower niceness; without it the worker keeps
    Ray's value (`RAY_worker_niceness=0` for the cluster avoids the question).
    """
    if os.nice(0) <= 0:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 0)
    except OSError as error:
        logger.info("worker keeps Ray's niceness %d (%s)", os.nice(0), error)


# how often a worker looks for its controller (a lookup in Ray's GCS); it leaves after two misses, so
# ~4 s after its controller is gone for good (a controller Ray restarts keeps its name meanwhile)
CONTROLLER_CHECK_S = 2.0


class ExpertWorkerActor:
    """Hosts one expert worker. Construct with its WorkerSettings as JSON (config.settings_json), and the name,
    namespace and actor id of the deployment controller that owns it (if any): the worker is a
    detached actor, so it outlives a controller that Ray restarts, and stops itself once that
    controller is gone for good (e.g. with the process that started it)."""

    def __init__(
        self, settings: str, controller: str | None = None, namespace: str = "", controller_id: str = ""
    ) -> None:
        from expert_service.server import WorkerService
        from moe_serve.config import WorkerSettings, settings_from_json
        from moe_serve.runtime.allocator import tune_allocator
        from moe_serve.runtime.eventloop import new_event_loop
        from moe_serve.runtime.grpc_utils import configure_logging

        tune_allocator()
        worker_settings = settings_from_json(WorkerSettings, settings)
        configure_logging(worker_settings.log_level, worker_settings.log_format)
        restore_scheduling_priority()
        context = ray.get_runtime_context()
        gpu_ids = ray.get_gpu_ids()
        self._loop = new_event_loop(worker_settings.event_loop)
        self._thread = threading.Thread(target=self._loop.run_forever, name="worker-grpc-loop", daemon=True)
        self._thread.start()
        self._service = WorkerService(
            worker_settings, node_id=context.get_node_id(), gpu_id=int(gpu_ids[0]) if gpu_ids else None
        )
        self._record = asyncio.run_coroutine_threadsafe(self._service.start(), self._loop).result()
        self._stopped = threading.Event()
        if controller:
            watched = (controller, namespace, controller_id)
            threading.Thread(target=self._leave_without_controller, args=watched, daemon=True).start()

    def record_json(self) -> str:
        """The worker's registry record (address, experts now announced, node, GPU) as JSON."""
        servicer = self._service.servicer
        return (servicer.record() if servicer is not None else self._record).to_json()

    def pid(self) -> int:
        """The actor's process id (for resource measurements)."""
        return os.getpid()

    def stop(self, grace_s: float = 5.0) -> None:
        """Deregister, finish in-flight calls within `grace_s`, stop serving."""
        self._stopped.set()
        asyncio.run_coroutine_threadsafe(self._service.stop(grace_s), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=grace_s + 5)

    def _leave_without_controller(self, controller: str, namespace: str, controller_id: str) -> None:
        """Stop serving and end this actor for good once the controller is gone twice in a row: its
        name gone, or taken by another actor (a new stack's controller). A controller Ray restarts
        keeps both its name and its actor id."""
        misses = 0
        while not self._stopped.wait(CONTROLLER_CHECK_S):
            try:
                found = ray.get_actor(controller, namespace=namespace)._actor_id.hex()
                misses = 0 if not controller_id or found == controller_id else misses + 1
            except ValueError:
                misses += 1
            except Exception as error:  # Ray itself unreachable for a moment: no verdict
                logger.info("could not look up controller %s (%s)", controller, error)
            if misses >= 2:
                logger.warning("controller %s is gone; worker leaves", controller)
                self.stop()
                ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
                return
