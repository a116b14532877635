"""Graceful shutdown: SIGTERM to the gateway, the router or a worker while a request is in flight
stops admitting at once, finishes the in-flight request exactly, and exits 0 within the grace
period; a rolling restart of workers under load loses no request.

The SIGTERM tests share one stack: each stops one of its services, and the next test finds that
service replaced by a new process (a stack whose router stopped is started anew; the router's test
comes last). The in-flight request is a large one on the wide-expert checkpoint, computed by a
worker with one compute thread: it stays in flight for a second or more, long enough to watch the
service drain around it. Times are taken when they happen (a done-callback, a thread waiting on
the process), and the reference outputs are computed only afterwards: on this 2-core machine the
reference of a large request competes with the worker for the CPU.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moe_serve.cluster.launcher import wait_until_ready
from moe_serve.cluster.processes import ServiceProcess, start_service_process
from tests.conftest import REDIS_URL
from tests.helpers import (
    ProcessStack,
    infer_request,
    internal_credentials,
    kserve_stub,
    reference_blocks,
    reference_forward,
    registered_worker_ids,
    response_tensors,
    start_process_stack,
    wait_until,
    worker_load,
)
from tests.integration.test_telemetry import scrape, total

GRACE_S = 5.0  # every service's drain period on SIGTERM (stop(grace_s=5.0))
EXIT_SLACK_S = 3.0  # after the drain: closing servers, telemetry, threads, the interpreter
INFLIGHT_TOKENS = 6144  # on the wide-expert checkpoint: ~1 s of one compute thread on an idle core
SMALL_TOKENS = 8
ONE_SLOW_WORKER = ("--compute-threads", "1")
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def hidden_states(tokens: int, seed: int) -> torch.Tensor:
    return torch.randn(tokens, 64, generator=torch.Generator().manual_seed(seed))


def exact(output: torch.Tensor, block: torch.nn.Module, hidden: torch.Tensor) -> bool:
    return torch.allclose(output, reference_forward(block, hidden)[0], rtol=1e-5, atol=1e-5)


def health_status(address: str, service: str) -> int:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return reply.status


class Termination:
    """SIGTERM sent to a service process, watched from a thread: when it exits, and with what code."""

    def __init__(self, process: ServiceProcess) -> None:
        self.process = process
        self.exit_code: int | None = None
        self.exited_after_s: float | None = None
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self.sent_at = time.monotonic()
        process.process.send_signal(signal.SIGTERM)
        self._watcher.start()

    def _watch(self) -> None:
        self.exit_code = self.process.process.wait()
        self.exited_after_s = time.monotonic() - self.sent_at

    def wait(self) -> tuple[int, float]:
        """The exit code and the seconds from SIGTERM to exit (fails when it has not exited by then)."""
        self._watcher.join(GRACE_S + EXIT_SLACK_S + 10)
        assert self.exit_code is not None and self.exited_after_s is not None, f"{self.process.name} did not exit"
        return self.exit_code, self.exited_after_s


@dataclass
class Drained:
    """What one SIGTERM-while-in-flight run measured (seconds from SIGTERM)."""

    stopped_admitting_s: float
    refusal: grpc.RpcError
    refused_while_inflight: bool
    inflight_output: torch.Tensor
    inflight_input: torch.Tensor
    inflight_answered_s: float
    exit_code: int
    exited_s: float


def sigterm_while_inflight(
    stack: ProcessStack, victim: ServiceProcess, stopped_admitting: Callable[[], bool], what: str
) -> Drained:
    """Put a request in flight at the (only) worker, SIGTERM `victim`, wait until `stopped_admitting()`,
    send one more request (it must be refused), then collect the in-flight answer and the exit."""
    channel, stub = kserve_stub(stack.address)
    with channel:
        hidden = hidden_states(INFLIGHT_TOKENS, seed=7)
        future = stub.ModelInfer.future(infer_request(stack.model, hidden), timeout=120)
        answered: list[float] = []
        future.add_done_callback(lambda _: answered.append(time.monotonic()))
        wait_until(lambda: worker_load(stack.workers[0].address).inflight_rows > 0, 30, "the request at the worker")

        termination = Termination(victim)
        stopped_s = wait_until(stopped_admitting, GRACE_S, what)
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(infer_request(stack.model, hidden_states(SMALL_TOKENS, 1)), timeout=10)
        refused_while_inflight = not future.done()
        output = response_tensors(future.result())["output"]
        wait_until(lambda: answered, 5, "the answer's time recorded")
        code, exited_s = termination.wait()
    return Drained(
        stopped_admitting_s=stopped_s,
        refusal=refused.value,
        refused_while_inflight=refused_while_inflight,
        inflight_output=output,
        inflight_input=hidden,
        inflight_answered_s=answered[0] - termination.sent_at,
        exit_code=code,
        exited_s=exited_s,
    )


def assert_drained(drained: Drained, block: torch.nn.Module, refusal_text: str) -> None:
    assert drained.refusal.code() == grpc.StatusCode.UNAVAILABLE, drained.refusal
    assert refusal_text in drained.refusal.details()
    assert drained.refused_while_inflight, "the in-flight request was answered before the refusal"
    assert drained.inflight_answered_s <= GRACE_S
    # it stayed up for its in-flight work (the router: until the worker had delivered the rows)
    assert drained.exited_s > drained.inflight_answered_s, "it exited before its in-flight request was answered"
    assert exact(drained.inflight_output, block, drained.inflight_input)
    assert drained.exit_code == 0
    assert drained.exited_s <= GRACE_S + EXIT_SLACK_S


def drain_figures(drained: Drained) -> dict[str, float | int]:
    return {
        "stopped_admitting_after_s": drained.stopped_admitting_s,
        "inflight_answered_after_s": drained.inflight_answered_s,
        "exited_after_s": drained.exited_s,
        "exit_code": drained.exit_code,
        "grace_s": GRACE_S,
    }


class SharedStack:
    """Router, one worker with one compute thread, and a gateway, shared by the SIGTERM tests: each test
    stops one service; `whole()` replaces what the previous test stopped before the next one runs."""

    def __init__(self, checkpoint: Path) -> None:
        self.checkpoint = checkpoint
        self.stack: ProcessStack | None = None

    def whole(self) -> ProcessStack:
        stack = self.stack
        if stack is None or stack.router.process.poll() is not None:
            self.discard()  # a new router has a new address: start everything anew
            self.stack = start_process_stack(self.checkpoint, [list(ONE_SLOW_WORKER)])
            return self.stack
        stack.workers = [worker for worker in stack.workers if worker.process.poll() is None]
        if not stack.workers:
            stack.workers.append(stack.start_worker("worker-0", *ONE_SLOW_WORKER))
        if stack.gateway.process.poll() is not None:
            arguments = ["gateway", "--router-address", stack.router.address, "--port", "0"]
            stack.gateway = start_service_process("gateway", arguments)
        wait_until_ready(stack.router.address, internal_credentials())
        return stack

    def discard(self) -> None:
        if self.stack is not None:
            self.stack.stop()
            self.stack = None


@pytest.fixture(scope="module")
def shared_stack(slow_checkpoint: Path) -> Iterator[SharedStack]:
    shared = SharedStack(slow_checkpoint)
    yield shared
    shared.discard()


@pytest.fixture
def own_stack(shared_stack: SharedStack, request: pytest.FixtureRequest) -> Iterator[ProcessStack]:
    """The shared stack, every service running, with exactly one worker: this test stops one of them."""
    failed_before = request.session.testsfailed
    stack = shared_stack.whole()
    yield stack
    if request.session.testsfailed != failed_before:  # it may have left a service half stopped
        shared_stack.discard()


@pytest.fixture
def block(slow_checkpoint: Path) -> torch.nn.Module:
    return reference_blocks(slow_checkpoint, torch.float32)[0]


def test_sigterm_to_the_gateway_refuses_new_requests_and_finishes_the_inflight_one(
    own_stack: ProcessStack, block: torch.nn.Module, reliability_record
) -> None:
    stack = own_stack
    drained = sigterm_while_inflight(
        stack,
        stack.gateway,
        lambda: health_status(stack.address, "inference.GRPCInferenceService") == NOT_SERVING,
        "gateway health NOT_SERVING",
    )
    assert_drained(drained, block, "gateway is shutting down")
    reliability_record(
        "shutdown-gateway",
        title="SIGTERM to the gateway mid-request",
        load=f"one T={INFLIGHT_TOKENS} request in flight (~1 s of compute)",
        faults="SIGTERM to the gateway; a new request sent while it drains",
        succeeded=1,
        failed=1,
        wrong_answers=0,
        recover_s=None,
        expected_failures="UNAVAILABLE for the request sent while draining (by design)",
        **drain_figures(drained),
    )


def test_sigterm_to_the_gateway_writes_an_open_streams_answers_before_it_closes(
    own_stack: ProcessStack, block: torch.nn.Module
) -> None:
    """Triton's ModelStreamInfer across a gateway drain: the stream's in-flight request is answered
    exactly on the stream, a request sent on it while draining gets an UNAVAILABLE error message,
    and the gateway exits 0 once every answer is written."""
    stack = own_stack
    outgoing: queue.Queue = queue.Queue()
    hidden = hidden_states(INFLIGHT_TOKENS, seed=9)
    channel, stub = kserve_stub(stack.address)
    with channel:
        answers = stub.ModelStreamInfer(iter(outgoing.get, None), timeout=60)
        request = infer_request(stack.model, hidden)
        request.id = "inflight"
        outgoing.put(request)
        wait_until(lambda: worker_load(stack.workers[0].address).inflight_rows > 0, 30, "the request at the worker")
        termination = Termination(stack.gateway)
        wait_until(
            lambda: health_status(stack.address, "inference.GRPCInferenceService") == NOT_SERVING,
            GRACE_S,
            "gateway health NOT_SERVING",
        )
        late = infer_request(stack.model, hidden_states(SMALL_TOKENS, 1))
        late.id = "late"
        outgoing.put(late)
        received = {answer.infer_response.id: answer for answer in itertools.islice(answers, 2)}
        outgoing.put(None)  # the client closes its side
        code, exited_s = termination.wait()

    assert received["late"].error_message.startswith("UNAVAILABLE: ")
    assert "gateway is shutting down" in received["late"].error_message
    assert received["inflight"].error_message == ""
    assert exact(response_tensors(received["inflight"].infer_response)["output"], block, hidden)
    assert code == 0 and exited_s <= GRACE_S + EXIT_SLACK_S


def test_sigterm_to_a_worker_deregisters_it_and_finishes_the_inflight_batch(
    own_stack: ProcessStack, block: torch.nn.Module, reliability_record
) -> None:
    """The only worker leaves: the registry drops it at once, so a new request is refused instead of
    sent to it; its in-flight batch is delivered exactly; it exits 0; a replacement restores serving."""
    stack = own_stack
    worker_id = str(stack.workers[0].ready["worker_id"])
    drained = sigterm_while_inflight(
        stack,
        stack.workers[0],
        lambda: worker_id not in registered_worker_ids(stack.router.address),
        "worker deregistered",
    )
    assert_drained(drained, block, "no live replica")

    stack.workers.append(stack.start_worker("worker-replacement", *ONE_SLOW_WORKER))
    channel, stub = kserve_stub(stack.address)
    with channel:
        after = hidden_states(SMALL_TOKENS, 2)
        answer = response_tensors(stub.ModelInfer(infer_request(stack.model, after), timeout=60))["output"]
    assert exact(answer, block, after)
    reliability_record(
        "shutdown-worker",
        title="SIGTERM to the only worker mid-request",
        load=f"one T={INFLIGHT_TOKENS} request in flight (~1 s of compute)",
        faults="SIGTERM to the worker; a new request sent while it drains; then a replacement started",
        succeeded=2,
        failed=1,
        wrong_answers=0,
        recover_s=None,
        expected_failures="UNAVAILABLE while no replica is registered (by design)",
        **drain_figures(drained),
    )


def test_sigterm_to_the_router_refuses_new_routes_and_finishes_the_inflight_one(
    own_stack: ProcessStack, block: torch.nn.Module, reliability_record
) -> None:
    """The router keeps its dispatch open until the worker has delivered the rows it was sent."""
    stack = own_stack
    drained = sigterm_while_inflight(
        stack,
        stack.router,
        lambda: health_status(stack.router.address, "moe_serve.v1.Router") == NOT_SERVING,
        "router health NOT_SERVING",
    )
    assert_drained(drained, block, "router is shutting down")
    reliability_record(
        "shutdown-router",
        title="SIGTERM to the router mid-request",
        load=f"one T={INFLIGHT_TOKENS} request in flight (~1 s of compute)",
        faults="SIGTERM to the router; a new request sent while it drains",
        succeeded=1,
        failed=1,
        wrong_answers=0,
        recover_s=None,
        expected_failures="UNAVAILABLE for the request sent while draining (by design)",
        **drain_figures(drained),
    )


@dataclass
class LoadOutcome:
    answered: int = 0
    answered_at: list[float] = field(default_factory=list)  # time.monotonic() of every exact answer
    wrong: int = 0
    slowest_s: float = 0.0  # the longest any request took, answered or failed
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


@contextlib.contextmanager
def client_load(stack: ProcessStack, blocks: list[torch.nn.Module], clients: int, tokens: int) -> Iterator[LoadOutcome]:
    """`clients` threads sending requests back to back (alternating MoE layers), each answer checked."""
    outcome, stop = LoadOutcome(), threading.Event()

    def run(client: int) -> None:
        channel, stub = kserve_stub(stack.address)
        with channel:
            for seed in range(client * 1_000_000, (client + 1) * 1_000_000):
                if stop.is_set():
                    return
                layer = seed % len(blocks)
                hidden = hidden_states(tokens, seed)
                sent = time.monotonic()
                try:
                    reply = stub.ModelInfer(infer_request(stack.model, hidden, layer=layer), timeout=30)
                except grpc.RpcError as error:
                    with outcome.lock:
                        outcome.failures.append(f"{error.code().name}: {error.details()}")
                    continue
                finally:
                    with outcome.lock:
                        outcome.slowest_s = max(outcome.slowest_s, time.monotonic() - sent)
                right = exact(response_tensors(reply)["output"], blocks[layer], hidden)
                with outcome.lock:
                    outcome.answered += 1
                    outcome.wrong += not right
                    if right:
                        outcome.answered_at.append(time.monotonic())

    threads = [threading.Thread(target=run, args=(client,), daemon=True) for client in range(clients)]
    for thread in threads:
        thread.start()
    try:
        yield outcome
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)


@pytest.mark.slow
@pytest.mark.parametrize("registry", ["router", "redis"])
def test_rolling_restart_of_workers_under_load_loses_no_request(
    registry: str, checkpoints, redis_prefix: str, reliability_record
) -> None:
    """Two workers, each holding every expert; each in turn is replaced: the new one starts and
    registers, then the old one gets SIGTERM (deregister, drain, exit 0). Clients never stop.

    As a Kubernetes rolling update does it (a pod at a time, SIGTERM), with the registry the router
    hosts and with the Redis one the manifests use (where routers learn of a departure through
    Redis, a moment after the worker announced it). `moe-serve scale` replacing every Ray worker
    under load is tests/integration/test_scaling.py::test_scale_workers_replaces_placement_without_failing_requests.
    """
    checkpoint = checkpoints(torch.float32)
    blocks = reference_blocks(checkpoint, torch.float32)
    clients, tokens = 3, 24
    common = ("--redis-url", REDIS_URL, "--redis-prefix", redis_prefix) if registry == "redis" else ()
    stack = start_process_stack(checkpoint, [[], []], common=common, router_args=("--metrics-port", "0"))
    try:
        exits: list[tuple[int, float]] = []
        terminated_at: list[float] = []
        registered_s: list[float] = []
        with client_load(stack, blocks, clients, tokens) as outcome:
            wait_until(lambda: outcome.answered >= 20, 30, "load running")
            started = time.monotonic()
            for generation, old in enumerate(list(stack.workers)):
                new = stack.start_worker(f"worker-{generation}-restarted")
                stack.workers.append(new)
                registered_s.append(
                    wait_until(
                        lambda new=new: new.ready["worker_id"] in registered_worker_ids(stack.router.address),
                        30,
                        "replacement registered",
                    )
                )
                termination = Termination(old)
                terminated_at.append(termination.sent_at)
                exits.append(termination.wait())
                stack.workers.remove(old)
                answered = outcome.answered
                wait_until(lambda answered=answered: outcome.answered >= answered + 20, 30, "serving after the restart")
            restart_s = time.monotonic() - started
        ids = registered_worker_ids(stack.router.address)
        # batches that reached a leaving worker after its drain and were retried on the other one
        retried = int(total(scrape(stack.router.ready["metrics_address"]), "moe_serve_dispatch_retries_total"))
    finally:
        stack.stop()

    assert outcome.failures == []
    assert outcome.wrong == 0
    assert outcome.answered >= 60
    assert [code for code, _ in exits] == [0, 0]
    assert all(seconds <= GRACE_S + EXIT_SLACK_S for _, seconds in exits)
    assert ids == {"worker-0-restarted", "worker-1-restarted"}
    # from each SIGTERM to the next exact answer
    next_answer_s = [min(t for t in outcome.answered_at if t > sent) - sent for sent in terminated_at]
    reliability_record(
        f"rolling-restart-{registry}-registry",
        title=f"Rolling restart of workers under load ({'Redis' if registry == 'redis' else 'router-hosted'} registry)",
        load=f"{clients} clients back to back, T={tokens}, both MoE layers; 2 workers, each every expert",
        faults="each worker in turn: replacement started and registered, then SIGTERM to the old one",
        succeeded=outcome.answered,
        failed=len(outcome.failures),
        wrong_answers=outcome.wrong,
        recover_s=max(next_answer_s),
        workers_restarted=len(exits),
        restart_duration_s=restart_s,
        old_worker_exit_s_max=max(seconds for _, seconds in exits),
        replacement_registered_s_max=max(registered_s),
        slowest_request_s=outcome.slowest_s,
        batches_retried=retried,
    )
