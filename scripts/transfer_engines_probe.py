"""Probe for issue 27 (which engine moves rows between processes): the time a reader takes to get one
buffer of a given size from an owner process, by each candidate, on this host:

- NIXL READ: one-sided; the owner only progresses its agent every 0.5 ms (as the router does);
- torch.distributed (gloo, NCCL's CPU twin): two-sided; the reader asks with a 1-element send, the
  owner answers with the buffer (a process group of fixed ranks);
- Ray: an actor returns the buffer from a method call, the reader ray.get()s it (the object store);
- gRPC bytes: a unary call answered with the buffer (what the compute hop does without an arena).

Not part of the product or its tests. `python scripts/transfer_engines_probe.py --output probe.json`
(NIXL from `pip install 'moe-serve[nixl]'`; Ray and torch come with moe-serve).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

import torch

SIZES = (1 << 10, 16 << 10, 256 << 10, 4 << 20)  # a decode step's rows up to a prefill chunk's


def buffers() -> list[torch.Tensor]:
    return [torch.randn(size // 4, generator=torch.Generator().manual_seed(size)) for size in SIZES]


def timed(repeat: int, call: Callable[[], object]) -> dict[str, float]:
    for _ in range(min(20, repeat)):
        call()  # connection set-up, caches
    seconds = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - started)
    seconds.sort()
    return {"p50_us": statistics.median(seconds) * 1e6, "p99_us": seconds[int(len(seconds) * 0.99)] * 1e6}


# ---------------------------------------------------------------- NIXL


def nixl_owner(pipe: Connection) -> None:
    from moe_serve.runtime.nixl_transport import NixlAgent, _api

    agent = NixlAgent(_api())
    owned = buffers()
    for buffer in owned:
        agent.register(buffer.data_ptr(), buffer.nbytes)
    pipe.send((agent.metadata(), [buffer.data_ptr() for buffer in owned]))
    stop = threading.Event()

    def progress() -> None:  # what the router's loop does while regions are lent
        while not stop.is_set():
            agent.agent.get_new_notifs()
            time.sleep(0.0005)

    threading.Thread(target=progress, daemon=True).start()
    pipe.recv()
    stop.set()


def nixl_reader(repeat: int) -> dict[str, dict[str, float]]:
    import asyncio

    from moe_serve.runtime.nixl_transport import NixlAgent, _api

    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    owner = context.Process(target=nixl_owner, args=(theirs,))
    owner.start()
    agent = NixlAgent(_api())
    metadata, addresses = ours.recv()
    peer = agent.connect(metadata)
    figures = {}
    loop = asyncio.new_event_loop()
    for size, address in zip(SIZES, addresses, strict=True):
        target = torch.zeros(size // 4)
        agent.register(target.data_ptr(), size)

        def read(target: torch.Tensor = target, address: int = address, size: int = size) -> None:
            loop.run_until_complete(agent.transfer("READ", target.data_ptr(), address, size, peer, 10, "probe"))

        figures[str(size)] = timed(repeat, read)
        assert torch.equal(target, torch.randn(size // 4, generator=torch.Generator().manual_seed(size)))
    ours.send("done")
    owner.join(30)
    return figures


# ---------------------------------------------------------------- torch.distributed (gloo)


def gloo_owner(port: int) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=2)
    owned, ask = buffers(), torch.zeros(1)
    while True:
        dist.recv(ask, src=1)
        index = int(ask.item())
        if index < 0:
            break
        dist.send(owned[index], dst=1)
    dist.destroy_process_group()


def gloo_reader(repeat: int) -> dict[str, dict[str, float]]:
    import socket

    import torch.distributed as dist

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    owner = multiprocessing.get_context("spawn").Process(target=gloo_owner, args=(port,))
    owner.start()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=1, world_size=2)
    figures = {}
    for index, size in enumerate(SIZES):
        target = torch.zeros(size // 4)

        def receive(index: int = index, target: torch.Tensor = target) -> None:
            dist.send(torch.tensor([float(index)]), dst=0)
            dist.recv(target, src=0)

        figures[str(size)] = timed(repeat, receive)
    dist.send(torch.tensor([-1.0]), dst=0)
    dist.destroy_process_group()
    owner.join(30)
    return figures


# ---------------------------------------------------------------- Ray


def ray_reader(repeat: int) -> dict[str, dict[str, float]]:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)

    @ray.remote
    class Owner:
        def __init__(self) -> None:
            self.owned = buffers()

        def get(self, index: int) -> torch.Tensor:
            return self.owned[index]

    try:
        owner = Owner.remote()
        figures = {
            str(size): timed(min(repeat, 300), lambda index=index: ray.get(owner.get.remote(index)))
            for index, size in enumerate(SIZES)
        }
    finally:
        ray.shutdown()
    return figures


# ---------------------------------------------------------------- gRPC bytes


def grpc_owner(pipe: Connection) -> None:
    from concurrent import futures

    import grpc

    owned = [buffer.numpy().tobytes() for buffer in buffers()]
    server = grpc.server(futures.ThreadPoolExecutor(2), options=[("grpc.max_send_message_length", 64 << 20)])
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: owned[request[0]])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("probe.Owner", {"Get": handler})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    pipe.send(port)
    pipe.recv()
    server.stop(0)


def grpc_reader(repeat: int) -> dict[str, dict[str, float]]:
    import grpc

    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    owner = context.Process(target=grpc_owner, args=(theirs,))
    owner.start()
    port = ours.recv()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", 64 << 20)])
    get = channel.unary_unary("/probe.Owner/Get")
    figures = {
        str(size): timed(
            repeat, lambda index=index: torch.frombuffer(bytearray(get(bytes([index]))), dtype=torch.float32)
        )
        for index, size in enumerate(SIZES)
    }
    channel.close()
    ours.send("done")
    owner.join(30)
    return figures


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=500)
    parser.add_argument("--output", help="write the figures as JSON here")
    arguments = parser.parse_args()
    engines = {
        "nixl_read": nixl_reader,
        "gloo_send_recv": gloo_reader,
        "ray_actor_get": ray_reader,
        "grpc_bytes": grpc_reader,
    }
    result = {
        "what": "time for a reader process to get one buffer from an owner process on this host, per engine",
        "machine": f"{cpu_model()}, {os.cpu_count()} cores",
        "repeat": arguments.repeat,
        "by_engine": {name: reader(arguments.repeat) for name, reader in engines.items()},
    }
    print(json.dumps(result, indent=2))
    if arguments.output:
        with open(arguments.output, "w") as file:
            json.dump(result, file, indent=2)


if __name__ == "__main__":
    main()
