"""`moe-serve up` as a supervisor (issue 23, items 1-3), with real processes throughout.

Three `up` processes, each in a session of its own (as a service manager starts one), started together:
- the first (router embedded in the gateway) loses its gateway, its controller actor and a worker
  actor to SIGKILL in turn under light load, serving exact answers again after each; then its whole
  process group gets SIGTERM, as systemd's `KillMode=control-group` sends it;
- the second (router as its own process) loses its router under load, serves again, and is then
  SIGKILLed itself;
- the third has no restarts to spend, and exits 1 naming the gateway it lost.
The pieces (restart budget, pinned ports, parent-death signal, PID reuse) also have fast tests of their own.
Every process `up` started is recorded (PID and start time) while it runs, so "nothing survives"
is checked for exactly those, and the finalisers SIGKILL whatever is left even when a test fails.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from expert_service.actor import ExpertWorkerActor
from moe_serve.cluster.launcher import launch_stack
from moe_serve.cluster.lifecycle import ProcessRecord, descendants, stop_processes
from moe_serve.cluster.processes import ServiceProcess, spawn_service_process
from moe_serve.cluster.supervisor import RestartPolicy, ServiceFailed, SupervisedService, pinned_arguments
from moe_serve.config import UpSettings
from moe_serve.runtime.grpc_utils import READY_MARKER
from tests.helpers import (
    infer_request,
    kserve_stub,
    reference_blocks,
    reference_forward,
    registered_worker_ids,
    response_tensors,
    wait_until,
)

START_TIMEOUT_S = 180
RECOVERY_TIMEOUT_S = 45  # a restarted gateway imports torch and loads the router: ~10 s on 2 busy cores
TOKENS = 4
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class UpProcess:
    """A `moe-serve up` subprocess, its ready line, its output, and every process it started."""

    process: subprocess.Popen[str]
    directory: Path  # its working directory: the cluster file tools find is under it
    output: list[str] = field(default_factory=list)
    ready: dict = field(default_factory=dict)
    started: set[ProcessRecord] = field(default_factory=set)  # grows while `up` lives
    _announced: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)

    def record_descendants(self) -> None:
        while not self._stop.wait(0.5) and self.process.poll() is None:
            self.started |= descendants(self.process.pid)

    def processes(self, name: str) -> list[psutil.Process]:
        """Live descendants whose command line mentions `name` (Ray names actor processes `ray::Class`)."""
        found = []
        for record in descendants(self.process.pid):
            try:
                process = psutil.Process(record.pid)
                if name in " ".join(process.cmdline()):
                    found.append(process)
            except psutil.Error:
                continue
        return found

    def tail(self) -> str:
        return "".join(self.output[-60:])

    def wait_ready(self) -> UpProcess:
        """Block until `up` announced its stack; stop everything and fail the test if it did not."""
        if not (self._announced.wait(START_TIMEOUT_S) and self.ready):
            self.kill_everything()
            pytest.fail(f"`up` did not become ready; its output:\n{self.tail()}")
        return self

    def kill_everything(self) -> None:
        """Finaliser: SIGKILL `up`'s group and every process it was seen to start."""
        self._stop.set()
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        stop_processes(self.started, grace_s=0)


def launch_up(
    directory: Path, checkpoint: Path, *flags: str, workers: int = 2, env: dict[str, str] | None = None
) -> UpProcess:
    """Start `moe-serve up` (in a session of its own) without waiting: `wait_ready()` waits for its stack."""
    # a Ray of its own, even where another one runs on this machine (the test session's, another `up`'s)
    environment = {**os.environ, **(env or {}), "RAY_ADDRESS": "local", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "moe_serve",
            "up",
            "--checkpoint",
            str(checkpoint),
            "--port",
            "0",
            "--workers",
            str(workers),
            *flags,
        ],
        cwd=directory,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=environment,
        start_new_session=True,  # its own process group, as systemd gives a service
    )
    up = UpProcess(process, directory)

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            up.output.append(line)
            if line.startswith(READY_MARKER) and not up.ready:
                up.ready.update(json.loads(line[len(READY_MARKER) :]))
                up._announced.set()
        up._announced.set()

    threading.Thread(target=read, daemon=True).start()
    threading.Thread(target=up.record_descendants, daemon=True).start()
    return up


class Load:
    """Light load: one client sending small requests back to back, each checked against transformers."""

    def __init__(self, address: str, model: str, checkpoint: Path) -> None:
        block = reference_blocks(checkpoint, torch.float32)[0]
        generator = torch.Generator().manual_seed(3)
        self.cases = [torch.randn(TOKENS, 64, generator=generator) for _ in range(4)]
        self.expected = [reference_forward(block, hidden)[0] for hidden in self.cases]
        self.address, self.model = address, model
        self.ok: list[float] = []  # times of exact answers
        self.failed: list[tuple[float, str]] = []
        self.wrong = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        channel, stub = kserve_stub(self.address)
        index = 0
        with channel:
            while not self._stop.wait(0.02):
                case = index % len(self.cases)
                index += 1
                try:
                    reply = stub.ModelInfer(infer_request(self.model, self.cases[case]), timeout=5)
                except grpc.RpcError as error:
                    self.failed.append((time.monotonic(), error.code().name))
                    continue
                output = response_tensors(reply)["output"]
                if torch.allclose(output, self.expected[case], rtol=1e-5, atol=1e-5):
                    self.ok.append(time.monotonic())
                else:
                    self.wrong += 1

    def answered_since(self, moment: float, count: int = 5) -> bool:
        return sum(1 for t in self.ok if t > moment) >= count

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def gateway_health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        request = health_pb2.HealthCheckRequest(service="")
        return health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status


@pytest.fixture(scope="module")
def fp32_checkpoint(checkpoints: Callable[[torch.dtype], Path]) -> Path:
    return checkpoints(torch.float32)


@pytest.fixture(scope="module")
def ups(tmp_path_factory: pytest.TempPathFactory, fp32_checkpoint: Path) -> Iterator[dict[str, UpProcess]]:
    """The module's three `up` processes, started together so that their start-ups (a Ray, the services
    and the worker actors each) overlap instead of queueing; the tests run once all are up (or failed),
    each on its own, while the others idle."""
    directory = tmp_path_factory.mktemp
    launched = {
        # a rebalance interval far beyond the test: a policy that must survive a controller restart
        "embedded": launch_up(directory("up-embedded"), fp32_checkpoint, "--rebalance", "3600"),
        "service": launch_up(directory("up-service"), fp32_checkpoint, "--router", "service"),
        # no restarts to spend (one worker is all it needs)
        "no restarts": launch_up(
            directory("up-no-restarts"), fp32_checkpoint, workers=1, env={"MOE_SERVE_RESTART_LIMIT": "0"}
        ),
    }
    try:
        for up in launched.values():
            up._announced.wait(START_TIMEOUT_S)  # each test's wait_ready() reports its own `up`'s failure
        yield launched
    finally:
        for up in launched.values():
            up.kill_everything()


@pytest.fixture(scope="module")
def embedded_up(ups: dict[str, UpProcess]) -> UpProcess:
    return ups["embedded"].wait_ready()


def survivors_after(started: set[ProcessRecord], bound_s: float) -> list[int]:
    """PIDs of the recorded processes still alive `bound_s` seconds from now; returns as soon as none
    is (a record names a PID and its start time, so a process that ended never counts again)."""
    deadline = time.monotonic() + bound_s
    while (alive := sorted(record.pid for record in started if record.alive())) and time.monotonic() < deadline:
        time.sleep(0.5)
    return alive


def sigkill_under_load(
    up: UpProcess, checkpoint: Path, victim_name: str, meanwhile: Callable[[], None] = lambda: None
) -> tuple[Load, float, float]:
    """SIGKILL the one process named `victim_name` while a client sends requests, then run `meanwhile`;
    return the load, the moment of the kill and the seconds until 5 exact answers came after it."""
    load = Load(up.ready["address"], up.ready["model"], checkpoint)
    try:
        wait_until(lambda: load.answered_since(0), 30, "exact answers before the fault")
        victims = up.processes(victim_name)
        assert len(victims) >= 1, f"no {victim_name} process among `up`'s descendants"
        killed_at = time.monotonic()
        victims[0].kill()
        meanwhile()
        recovered_s = wait_until(
            lambda: load.answered_since(killed_at), RECOVERY_TIMEOUT_S, f"exact answers after {victim_name} died"
        )
    finally:
        load.stop()
    assert load.wrong == 0
    assert up.process.poll() is None, up.tail()
    return load, killed_at, recovered_s


@pytest.mark.slow
def test_a_killed_gateway_is_restarted_on_its_port(embedded_up: UpProcess, fp32_checkpoint: Path) -> None:
    load, _, recovered_s = sigkill_under_load(embedded_up, fp32_checkpoint, "moe_serve gateway")
    assert "gateway died (exit code -9)" in embedded_up.tail() and "gateway restarted" in embedded_up.tail()
    print(f"gateway: exact answers again {recovered_s:.1f} s after SIGKILL; {len(load.failed)} requests failed")


@pytest.mark.slow
def test_a_killed_controller_restarts_and_workers_keep_serving(embedded_up: UpProcess, fp32_checkpoint: Path) -> None:
    workers_before = {p.pid for p in embedded_up.processes("ray::ExpertWorkerActor")}
    load, killed_at, _ = sigkill_under_load(embedded_up, fp32_checkpoint, "ray::DeploymentController")
    # the workers never died with it, so serving never stopped
    assert {p.pid for p in embedded_up.processes("ray::ExpertWorkerActor")} == workers_before
    assert not [f for f in load.failed if f[0] > killed_at], load.failed
    # Ray restarted the controller, which adopted the live workers: `moe-serve status` lists them
    wait_until(lambda: embedded_up.processes("ray::DeploymentController"), 30, "a controller again", poll_s=0.5)
    status = subprocess.run(
        [sys.executable, "-m", "moe_serve", "status", "--json"],
        cwd=embedded_up.directory,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert status.returncode == 0, status.stdout + status.stderr
    document = json.loads(status.stdout)
    worker_ids = {w["worker_id"] for w in document["workers"]}
    assert worker_ids == registered_worker_ids(embedded_up.ready["router"])
    assert len(worker_ids) == 2
    # and it runs the stack's policies again (--rebalance)
    assert document["policies"] == {"rebalance_interval_s": 3600.0, "autoscale": None}


@pytest.mark.slow
def test_a_killed_worker_actor_is_restarted_by_ray(embedded_up: UpProcess, fp32_checkpoint: Path) -> None:
    load, _, recovered_s = sigkill_under_load(embedded_up, fp32_checkpoint, "ray::ExpertWorkerActor")
    print(f"worker: exact answers again {recovered_s:.1f} s after SIGKILL; {len(load.failed)} requests failed")


@pytest.mark.slow
def test_group_sigterm_stops_everything(embedded_up: UpProcess) -> None:
    """Scenario 1, last on this `up`: SIGTERM to every process of its group at once, as systemd sends it."""
    up = embedded_up
    up.started |= descendants(up.process.pid)
    sent = time.monotonic()
    os.killpg(up.process.pid, signal.SIGTERM)
    code = up.process.wait(20)
    exited_s = time.monotonic() - sent
    assert code == 0, up.tail()
    assert exited_s <= 15, f"`up` took {exited_s:.1f} s to exit"
    survivors = survivors_after(up.started, 10)
    assert not survivors, f"alive 10 s after `up` exited: {survivors}\n{up.tail()}"
    print(f"group SIGTERM: `up` exited 0 after {exited_s:.1f} s; none of {len(up.started)} processes left")


@pytest.mark.slow
def test_router_restarts_then_nothing_survives_sigkill_of_up(ups: dict[str, UpProcess], fp32_checkpoint: Path) -> None:
    """Scenarios 2 (router, as its own process) and 5 (SIGKILL of `up` itself)."""
    up = ups["service"].wait_ready()
    try:
        # while the router is down the gateway says so: readiness NOT_SERVING, until the restart
        def not_ready() -> None:
            wait_until(lambda: gateway_health(up.ready["address"]) == NOT_SERVING, 10, "NOT_SERVING", poll_s=0.1)

        load, _, recovered_s = sigkill_under_load(up, fp32_checkpoint, "moe_serve router", not_ready)
        # exact answers may come before every worker has registered with the new router (a request
        # needs only its own experts); readiness waits for a replica of every expert
        serving = health_pb2.HealthCheckResponse.SERVING
        wait_until(lambda: gateway_health(up.ready["address"]) == serving, 10, "SERVING after the restart", poll_s=0.1)
        assert "router died (exit code -9)" in up.tail()
        print(f"router: exact answers again {recovered_s:.1f} s after SIGKILL; {len(load.failed)} requests failed")
        up.started |= descendants(up.process.pid)
        up.process.kill()
        up.process.wait(10)
        survivors = survivors_after(up.started, 30)
        assert not survivors, f"alive 30 s after SIGKILL of `up`: {survivors}"
    finally:
        up.kill_everything()


def test_restart_budget_names_the_service_that_keeps_dying() -> None:
    """A service that dies at once, every time: restarted `limit` times with backoff, then ServiceFailed."""
    # json.tool refuses an unknown flag with exit code 2: a real process that dies straight away
    crashing = spawn_service_process("crasher", ["--no-such-flag"], module="json.tool")
    supervised = SupervisedService(crashing, RestartPolicy(limit=2, window_s=60, first_backoff_s=0.01))
    deadline = time.monotonic() + 30
    with pytest.raises(ServiceFailed, match=r"crasher died \(exit code 2\) after 2 restarts within 60 s"):
        while time.monotonic() < deadline:
            supervised.poll()
            time.sleep(0.01)
    assert not supervised.healthy


def test_restarts_reuse_the_announced_ports() -> None:
    service = ServiceProcess(
        name="gateway",
        process=subprocess.Popen([sys.executable, "-c", "pass"]),
        ready={"address": "127.0.0.1:41234", "router_address": "127.0.0.1:41235"},
        args=["gateway", "--port", "0", "--router-port", "0", "--metrics-port", "0"],
    )
    service.process.wait()
    assert pinned_arguments(service) == [
        "gateway",
        "--port",
        "41234",
        "--router-port",
        "41235",
        "--metrics-port",
        "0",
    ]


@pytest.mark.slow
def test_up_exits_non_zero_naming_the_service_once_its_restart_budget_is_spent(ups: dict[str, UpProcess]) -> None:
    """With no restarts allowed (MOE_SERVE_RESTART_LIMIT=0), a killed gateway ends `up` at once: exit 1,
    naming it, nothing left."""
    up = ups["no restarts"].wait_ready()
    try:
        up.started |= descendants(up.process.pid)
        (gateway,) = up.processes("moe_serve gateway")
        gateway.kill()
        assert up.process.wait(30) == 1, up.tail()
        assert "gateway died (exit code -9) after 0 restarts within 300 s; giving up" in up.tail()
        survivors = survivors_after(up.started, 10)
        assert not survivors, f"alive 10 s after `up` gave up: {survivors}"
    finally:
        up.kill_everything()


CHILD = """
import time
from moe_serve.cluster.lifecycle import die_with_parent
die_with_parent()
print("armed", flush=True)
time.sleep(60)
"""
PARENT = """
import os, subprocess, sys, time
from moe_serve.cluster.lifecycle import child_environment
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], env={**os.environ, **child_environment()})
print(child.pid, flush=True)
time.sleep(60)
"""


def test_a_child_started_with_the_parent_pid_dies_with_its_parent() -> None:
    """PR_SET_PDEATHSIG alone (no watchdog here): SIGKILL of the parent ends the child within a second."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD], stdout=subprocess.PIPE, text=True)
    child: ProcessRecord | None = None
    try:
        assert parent.stdout is not None
        child_pid = int(parent.stdout.readline())
        child = ProcessRecord.of(psutil.Process(child_pid))
        assert parent.stdout.readline().strip() == "armed"  # the child writes to the same pipe
        parent.kill()
        parent.wait(10)
        wait_until(lambda: not child.alive(), 5, "the child gone with its parent")
    finally:
        parent.kill()
        if child is not None:
            stop_processes({child}, grace_s=0)


def test_a_reused_pid_is_never_signalled() -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        real = ProcessRecord.of(psutil.Process(sleeper.pid))
        impostor = ProcessRecord(real.pid, real.started - 1)  # same PID, another process's start time
        assert real.alive() and not impostor.alive()
        assert stop_processes({impostor}, grace_s=0.2) == set()
        assert sleeper.poll() is None
        assert stop_processes({real}, grace_s=5) == set()
        assert sleeper.wait(5) == -signal.SIGTERM
    finally:
        sleeper.kill()


def test_workers_leave_once_their_controller_is_gone_for_good(ray_cluster: str, fp32_checkpoint: Path) -> None:
    """Detached workers outlive a controller Ray restarts (above), but not one that is dead for good,
    e.g. with `moe-serve workers` SIGKILLed on a remote cluster: they stop and their names go."""
    import ray

    stack = launch_stack(UpSettings(port=0, workers=1), fp32_checkpoint, worker_actor=ExpertWorkerActor)
    try:
        prefix = f"{stack.controller_name}/"

        def named() -> list[str]:
            return [actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)]

        assert [name for name in named() if name.startswith(prefix)] == [f"{prefix}{stack.model_name}-w0"]
        ray.kill(stack.controller, no_restart=True)
        wait_until(lambda: not any(name.startswith(prefix) for name in named()), 30, "the worker gone", poll_s=0.5)
    finally:
        stack.gateway.stop()
        stack.router.stop()
