"""Probe for issue 27 (the cross-host engine): how long a NIXL READ of host memory takes between two
processes, the one-sided transfer a worker would use to fetch a gateway's rows by descriptor.

Not part of the product or its tests: NIXL is not a dependency yet. Run it where NIXL imports:

    pip install --no-deps --target /tmp/nixl nixl-cu12==1.5.1    # the `nixl` meta-package needs a cu13 wheel too
    PYTHONPATH=/tmp/nixl python scripts/nixl_host_probe.py --output probe.json

An owner process registers one buffer per size with its UCX agent and sends its agent metadata and
the buffers' serialized descriptors through a pipe (the gRPC stream's initial metadata would carry
them in the product); a reader process registers its own buffers and READs each one `--repeat`
times, polling for completion, and checks the bytes.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import statistics
import time
from importlib.metadata import version
from multiprocessing.connection import Connection

import torch

SIZES = (1 << 10, 16 << 10, 256 << 10, 4 << 20)  # a decode step's rows up to a prefill chunk's


def agent(name: str):
    from nixl_cu12._api import nixl_agent, nixl_agent_config

    return nixl_agent(name, nixl_agent_config(backends=["UCX"]))


def owner(pipe: Connection) -> None:
    me = agent("owner")
    buffers = [torch.randn(size // 4, generator=torch.Generator().manual_seed(size)) for size in SIZES]
    for buffer in buffers:
        me.register_memory(buffer)
    descriptors = [me.get_serialized_descs(me.get_xfer_descs(buffer)) for buffer in buffers]
    pipe.send((me.get_agent_metadata(), descriptors))
    pipe.recv()  # keep the memory registered until the reader is done


def reader(pipe: Connection, repeat: int) -> dict:
    me = agent("reader")
    metadata, descriptors = pipe.recv()
    remote = me.add_remote_agent(metadata)
    figures = {}
    for size, serialized in zip(SIZES, descriptors, strict=True):
        target = torch.zeros(size // 4)
        me.register_memory(target)
        handle = me.initialize_xfer("READ", me.get_xfer_descs(target), me.deserialize_descs(serialized), remote)
        seconds = []
        for _ in range(repeat):
            started = time.perf_counter()
            me.transfer(handle)
            while (state := me.check_xfer_state(handle)) != "DONE":
                if state == "ERR":
                    raise RuntimeError(f"NIXL READ of {size} B failed")
            seconds.append(time.perf_counter() - started)
        expected = torch.randn(size // 4, generator=torch.Generator().manual_seed(size))
        seconds.sort()
        figures[str(size)] = {
            "p50_us": statistics.median(seconds) * 1e6,
            "p99_us": seconds[int(len(seconds) * 0.99)] * 1e6,
            "gb_per_s_at_p50": size / statistics.median(seconds) / 1e9,
            "exact": torch.equal(target, expected),
        }
    pipe.send("done")
    return figures


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1000)
    parser.add_argument("--output", help="write the figures as JSON here")
    arguments = parser.parse_args()
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    process = context.Process(target=owner, args=(theirs,))
    process.start()
    try:
        figures = reader(ours, arguments.repeat)
    finally:
        process.join(30)
    result = {
        "what": "NIXL (UCX backend) READ of host memory from another process on the same host",
        "nixl": "nixl-cu12 " + version("nixl-cu12"),
        "machine": f"{cpu_model()}, {multiprocessing.cpu_count()} cores",
        "repeat": arguments.repeat,
        "by_size_bytes": figures,
    }
    print(json.dumps(result, indent=2))
    if arguments.output:
        with open(arguments.output, "w") as file:
            json.dump(result, file, indent=2)


if __name__ == "__main__":
    main()
