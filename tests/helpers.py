"""Test helpers: tiny transformers checkpoints, their reference MoE blocks, KServe request building."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import grpc
import torch
from grpc import aio
from transformers import MixtralConfig, MixtralForCausalLM

from moe_serve.cluster.launcher import embedded_router_of, wait_until_ready
from moe_serve.cluster.processes import ServiceProcess, spawn_service_process, start_service_process
from moe_serve.protos import moe_serve_pb2 as moe_pb2
from moe_serve.protos import moe_serve_pb2_grpc as moe_grpc
from moe_serve.runtime.grpc_utils import READY_MARKER
from moe_serve.runtime.security import CLUSTER_SECRET_ENV, ClusterCredentials, open_channel
from moe_serve_client.protos import grpc_predict_v2_pb2 as kserve_pb2
from moe_serve_client.protos import grpc_predict_v2_pb2_grpc as kserve_grpc
from moe_serve_client.requests import RequestedOutput
from moe_serve_client.requests import infer_request as build_infer_request
from moe_serve_client.requests import response_tensors as decode_response
from tests.families import rescale_moe_weights

REPOSITORY = Path(__file__).resolve().parent.parent
CLIENT_SCRIPTS = REPOSITORY / "tests" / "clients"  # client programs, each run in a fresh process of its own

TINY_MIXTRAL = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "max_position_embeddings": 128,
}


def save_tiny_mixtral(directory: Path, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides: int) -> Path:
    """Build a tiny Mixtral with transformers (no hub), save it with save_pretrained, return the directory."""
    torch.manual_seed(seed)
    config = MixtralConfig(**{**TINY_MIXTRAL, **overrides})
    model = MixtralForCausalLM(config)
    rescale_moe_weights(model, seed)
    model.to(dtype).save_pretrained(directory)
    return directory


def reference_blocks(directory: Path, dtype: torch.dtype) -> list[torch.nn.Module]:
    """The transformers MoE block of every layer, loaded by transformers from the saved files.

    Loaded once per checkpoint and dtype for the whole run (a load costs about a second, and the
    fuzz tests compare hundreds of answers): treat the blocks as read-only, deepcopy one to alter it."""
    return list(_loaded_reference_blocks(Path(directory).resolve(), dtype))


@functools.cache
def _loaded_reference_blocks(directory: Path, dtype: torch.dtype) -> tuple[torch.nn.Module, ...]:
    model = MixtralForCausalLM.from_pretrained(directory, dtype=dtype)
    model.eval()
    return tuple(layer.mlp for layer in model.model.layers)


def reference_forward(block: torch.nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(output [T, d], router_logits [T, E] float32, expert ids [T, k]) of the transformers block."""
    with torch.no_grad():
        output = block(hidden.unsqueeze(0)).reshape(hidden.shape)
        logits, _, ids = block.gate(hidden)
    return output, logits.float(), ids


def infer_request(
    model_name: str,
    hidden: torch.Tensor,
    layer: int | None = 0,
    outputs: Sequence[str | RequestedOutput] = (),
    shape: list[int] | None = None,
    **options: Any,
) -> kserve_pb2.ModelInferRequest:
    """The tests' request (id "test", layer 0 unless given), built by the client's builder; `shape`
    declares another shape than the tensor's (a malformed request), `options` go to the builder."""
    request = build_infer_request(model_name, hidden, layer=layer, outputs=outputs, request_id="test", **options)
    if shape:
        request.inputs[0].shape[:] = shape
    return request


def response_tensors(response: kserve_pb2.ModelInferResponse) -> dict[str, torch.Tensor]:
    """The response's tensors by name, copied out of the message (writable)."""
    return {name: tensor.clone() for name, tensor in decode_response(response).items()}


def kserve_stub(address: str) -> tuple[grpc.Channel, kserve_grpc.GRPCInferenceServiceStub]:
    channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 256 << 20)])
    return channel, kserve_grpc.GRPCInferenceServiceStub(channel)


def internal_credentials() -> ClusterCredentials:
    """The cluster secret every stack of this test run is started with (set in tests/conftest.py)."""
    return ClusterCredentials(os.environ[CLUSTER_SECRET_ENV].encode())


def internal_channel(address: str, options: list[tuple[str, Any]] | None = None) -> grpc.Channel:
    """A channel to an internal service of a test stack, carrying the run's cluster token."""
    return open_channel(address, options or [], internal_credentials())


def gateway_stats(delivery_address: str) -> moe_pb2.GatewayStats:
    """GatewayAdmin.GetStats of the gateway whose internal (delivery) address this is."""
    with internal_channel(delivery_address) as channel:
        return moe_grpc.GatewayAdminStub(channel).GetStats(moe_pb2.GatewayStatsRequest(), timeout=10)


def router_rows_sent(router_address: str) -> int:
    """Rows the router has sent to expert workers since it started (all layers and experts)."""
    with internal_channel(router_address) as channel:
        reply = moe_grpc.RouterStub(channel).GetExpertLoad(moe_pb2.ExpertLoadRequest(), timeout=10)
    return sum(expert.rows for expert in reply.experts)


def registered_worker_ids(router_address: str) -> set[str]:
    with internal_channel(router_address) as channel:
        reply = moe_grpc.RouterStub(channel).ListWorkers(moe_pb2.ListWorkersRequest(), timeout=10)
    return {worker.worker_id for worker in reply.workers}


RouterMode = Literal["service", "embedded"]
ROUTER_MODES: tuple[RouterMode, ...] = ("embedded", "service")


@dataclass
class ProcessStack:
    """Router, `moe-serve worker` processes and a gateway, each its own process (no Ray)."""

    checkpoint: Path
    router: ServiceProcess
    workers: list[ServiceProcess]
    gateway: ServiceProcess
    common: list[str] = field(default_factory=list)
    router_mode: RouterMode = "service"

    def scenario(self, name: str) -> str:
        """A reliability record's name for this stack: the default (embedded) mode keeps `name`."""
        return name if self.router_mode == "embedded" else f"{name}-router-service"

    def titled(self, title: str) -> str:
        return title if self.router_mode == "embedded" else f"{title} (router as its own service)"

    @property
    def address(self) -> str:
        return self.gateway.address

    @property
    def model(self) -> str:
        return str(self.gateway.ready["model"])

    @property
    def delivery_address(self) -> str:
        return str(self.gateway.ready["delivery_address"])

    @property
    def http_address(self) -> str | None:
        """host:port of the gateway's KServe v2 REST endpoint (None with --no-http)."""
        return self.gateway.ready.get("http_address")

    def start_worker(self, name: str, *args: str) -> ServiceProcess:
        """One more worker registered at this stack's router (all experts unless --experts is given)."""
        return start_service_process(name, self.worker_args(name, *args))

    def worker_args(self, name: str, *args: str) -> list[str]:
        return [
            "worker",
            "--checkpoint",
            str(self.checkpoint),
            "--port",
            "0",
            "--worker-id",
            name,
            "--router-address",
            self.router.address,
            *self.common,
            *args,
        ]

    def stop(self) -> None:
        for process in (self.gateway, *self.workers, self.router):
            process.stop()


def start_process_stack(
    checkpoint: Path,
    worker_args: list[list[str]],
    gateway_args: tuple[str, ...] = (),
    common: tuple[str, ...] = (),
    router_args: tuple[str, ...] = (),
    router_mode: RouterMode = "service",
) -> ProcessStack:
    """Start a router, then a gateway and one worker per entry of `worker_args` (its extra flags) side
    by side (as launch_stack does); return once every expert has a replica and the gateway listens.

    `common` flags go to every service (e.g. --max-message-bytes). `router_mode` "embedded": the
    router runs inside the gateway (started first; `router_args` go to it), as `moe-serve up` runs it.
    """
    if router_mode == "embedded":
        arguments = ["gateway", "--embedded-router", "--checkpoint", str(checkpoint), "--router-port", "0"]
        gateway = start_service_process("gateway", [*arguments, "--port", "0", *common, *router_args, *gateway_args])
        router = embedded_router_of(gateway)
    else:
        router = start_service_process(
            "router", ["router", "--checkpoint", str(checkpoint), "--port", "0", *common, *router_args]
        )
        gateway = spawn_service_process(
            "gateway", ["gateway", "--router-address", router.address, "--port", "0", *common, *gateway_args]
        )
    stack = ProcessStack(checkpoint, router, [], gateway, list(common), router_mode)
    try:
        names = [f"worker-{index}" for index in range(len(worker_args))]
        with ThreadPoolExecutor(max(1, len(worker_args))) as pool:
            stack.workers = list(
                pool.map(lambda item: stack.start_worker(item[0], *item[1]), zip(names, worker_args, strict=True))
            )
        wait_until_ready(router.address, internal_credentials())
        gateway.wait_ready()
    except BaseException:
        for process in (gateway, *stack.workers, router):
            process.stop()
        raise
    return stack


def worker_load(worker_address: str) -> moe_pb2.WorkerLoad:
    """A worker's live load (rows in flight and queued) from its Describe RPC."""
    with internal_channel(worker_address) as channel:
        return moe_grpc.ExpertWorkerStub(channel).Describe(moe_pb2.DescribeWorkerRequest(), timeout=10).load


class FakeClock:
    """Stands in for the `time` module of code under test (monkeypatched): `monotonic()` is `now`."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@contextlib.asynccontextmanager
async def loopback_stream_server(
    service: str, method: str, handler: grpc.RpcMethodHandler, options: Sequence[tuple[str, Any]] = ()
) -> AsyncIterator[str]:
    """An aio server on a free loopback port serving `handler` as /service/method; yields its address."""
    server = aio.server(options=list(options))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(service, {method: handler})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


def wait_until(condition: Callable[[], object], timeout_s: float, what: str, poll_s: float = 0.02) -> float:
    """Poll `condition` until true; returns the seconds it took, fails the test after `timeout_s`."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, f"{what}: not within {timeout_s} s"
        time.sleep(poll_s)
    return time.monotonic() - started


class ExactLoad:
    """One client thread sending requests of `tokens` tokens back to back (`with ExactLoad(...) as load`)
    and checking every answer against `block`; `answered` counts the exact ones, `failures` says what
    went wrong (a wrong answer, or a status)."""

    def __init__(
        self, stub: Any, model: str, block: torch.nn.Module, tokens: int, timeout_s: float = 30, hidden_size: int = 64
    ) -> None:
        self.stub, self.model, self.block, self.timeout_s = stub, model, block, timeout_s
        self.shape = (tokens, hidden_size)
        self.answered, self.failures = 0, list[str]()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="exact-load")

    def _run(self) -> None:
        seed = 0
        while not self._stop.is_set():
            seed += 1
            hidden = torch.randn(*self.shape, generator=torch.Generator().manual_seed(seed))
            try:
                request = infer_request(self.model, hidden)
                output = response_tensors(self.stub.ModelInfer(request, timeout=self.timeout_s))["output"]
                if not torch.allclose(output, reference_forward(self.block, hidden)[0], rtol=1e-5, atol=1e-5):
                    self.failures.append(f"wrong answer for seed {seed}")
                self.answered += 1
            except grpc.RpcError as error:
                self.failures.append(f"{error.code().name}: {error.details()}")

    def wait_for(self, more: int, timeout_s: float, what: str) -> None:
        """Until `more` further answers (or a failure)."""
        target = self.answered + more
        wait_until(lambda: self.answered >= target or self.failures, timeout_s, what)

    def __enter__(self) -> ExactLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(30)


BLOCKER_TOKENS = 12288  # on the wide-expert checkpoint: ~2 s of one compute thread


def start_blocker(
    stub: kserve_grpc.GRPCInferenceServiceStub, model: str, worker_address: str, seed: int = 1
) -> tuple[torch.Tensor, grpc.Future]:
    """Send a large request and return once the worker computes it: requests sent until it finishes
    queue behind it (on a worker with one compute thread). Returns its input and its future."""
    hidden = torch.randn(BLOCKER_TOKENS, 64, generator=torch.Generator().manual_seed(seed))
    future = stub.ModelInfer.future(infer_request(model, hidden), timeout=120)
    wait_until(lambda: worker_load(worker_address).inflight_rows > 0, 30, "the blocker at the worker")
    return hidden, future


@contextlib.contextmanager
def paused(process: ServiceProcess) -> Iterator[None]:
    """The process stopped (SIGSTOP) for the block: what is sent to it waits in its socket, so the
    requests that need it stay in flight; continued (SIGCONT) on the way out."""
    process.process.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        process.process.send_signal(signal.SIGCONT)


class UpCommand:
    """`moe-serve up ARGUMENTS` as a child process in `directory`, its output read as it comes.

    `ready` holds the stack's ready announcement once `wait_ready` returned; `output` every line so far."""

    def __init__(self, directory: Path, arguments: list[str], env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moe_serve", "up", *arguments],
            cwd=directory,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            # a Ray of its own, even where another one runs on this machine (ray.init() would join the
            # latest one started with `ray start` or ray.cluster_utils); as where none runs
            env={**env, "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": "local"},
        )
        self.ready: dict[str, Any] = {}
        self.output: list[str] = []
        self._found = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)
            if line.startswith(READY_MARKER) and not self.ready:
                self.ready.update(json.loads(line[len(READY_MARKER) :]))
                self._found.set()
        self._found.set()  # the output ended: `up` exited before it was ready

    def wait_ready(self, timeout_s: float = 180) -> dict[str, Any]:
        assert self._found.wait(timeout_s) and self.ready, "".join(self.output[-40:])
        return self.ready

    def interrupt(self, timeout_s: float) -> int:
        """Ctrl-C, as a person stops it; the exit code, once its output has been read to the end."""
        self.process.send_signal(signal.SIGINT)
        code = self.process.wait(timeout_s)
        self._reader.join(10)
        return code

    @property
    def text(self) -> str:
        return "".join(self.output)


def lay_into_hub_cache(checkpoint: Path, hf_home: Path, repo_id: str, commit: str, ref: str = "main") -> Path:
    """Copy a checkpoint directory into `hf_home/hub` as huggingface_hub lays a downloaded snapshot out:
    `models--org--name/blobs/<hash>` holding the bytes, `snapshots/<commit>/<file>` relative symlinks to
    them, `refs/<ref>` holding the commit. Returns the snapshot directory."""
    import hashlib
    import shutil

    folder = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    blobs, snapshot = folder / "blobs", folder / "snapshots" / commit
    blobs.mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for source in sorted(checkpoint.iterdir()):
        digest = hashlib.sha256(source.read_bytes()).hexdigest()
        shutil.copyfile(source, blobs / digest)
        (snapshot / source.name).symlink_to(Path("..") / ".." / "blobs" / digest)
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / ref).write_text(commit)
    return snapshot
