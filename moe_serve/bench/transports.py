"""The transports section: the same stack with the compute hop's rows moved by each transport.

Three stacks of the bench's shape with thin experts (intermediate size 8: the data path, not the
experts), the router in the gateway, differing only in MOE_SERVE_TRANSPORTS: "shm" (a mapped arena,
the default), "nixl" (one-sided NIXL transfers of the same arena, what a worker on another host uses)
and "bytes" (rows in the messages). They are timed interleaved (T=1 p50, large-T tokens/s); each
stack's workers report how their rows arrived, so every column is checked to be what it says.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import grpc
import torch
from prometheus_client.parser import text_string_to_metric_families

from moe_serve.bench.runner import BenchConfig, bench_checkpoint, launch_bench_stack, measure_interleaved
from moe_serve.bench.runner import served_subject as stack_subject
from moe_serve.bench.thin import THIN_INTERMEDIATE_SIZE
from moe_serve.cluster.launcher import Stack, init_ray
from moe_serve.config import DEFAULT_MAX_MESSAGE_BYTES
from moe_serve.runtime.grpc_utils import channel_options

TRANSPORTS: dict[str, tuple[str, ...]] = {"shm": ("shm",), "nixl": ("nixl",), "bytes": ()}


def rows_by_transport(metrics_addresses: Iterable[str], direction: str = "received") -> dict[str, float]:
    """Rows the workers at these /metrics addresses received from the router (or, direction "delivered",
    sent to the gateway), per transport, added up (moe_serve_worker_transport_rows_total)."""
    counted: dict[str, float] = {}
    for address in metrics_addresses:
        port = address.rpartition(":")[2]
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "moe_serve_worker_transport_rows_total" and sample.labels["direction"] == direction:
                    name = sample.labels["transport"]
                    counted[name] = counted.get(name, 0.0) + sample.value
    return counted


def transports_section(config: BenchConfig, inputs: dict[int, torch.Tensor]) -> dict[str, Any]:
    """T=1 p50 and large-T tokens/s per transport, each stack's own rows per transport, and the
    ratios against rows as bytes; starts and stops its stacks (on a local Ray of its own if none runs)."""
    import ray

    thin = replace(config, intermediate_size=THIN_INTERMEDIATE_SIZE)
    checkpoint_dir = bench_checkpoint(thin)
    owns_ray = not ray.is_initialized()
    if owns_ray:
        init_ray(log_to_driver=False)
    stacks: dict[str, Stack] = {}
    channels: list[grpc.Channel] = []
    try:
        with ThreadPoolExecutor(len(TRANSPORTS), thread_name_prefix="bench-transports") as pool:
            launches = {
                name: pool.submit(launch_bench_stack, thin, checkpoint_dir, "embedded", transports)
                for name, transports in TRANSPORTS.items()
            }
            for name, launch in launches.items():
                if launch.exception() is None:
                    stacks[name] = launch.result()
            for launch in launches.values():
                launch.result()  # the first failure, if any (the started stacks are stopped below)
        subjects = []
        for name, stack in stacks.items():
            channels.append(grpc.insecure_channel(stack.address, options=channel_options(DEFAULT_MAX_MESSAGE_BYTES)))
            subjects.append(stack_subject(stack, channels[-1], thin, inputs, name=name))
        measured = measure_interleaved(subjects, thin)
        arrived = {
            name: rows_by_transport(record.metrics_address for record in stack.workers)
            for name, stack in stacks.items()
        }
    finally:
        for channel in channels:
            channel.close()
        for stack in stacks.values():
            stack.stop()
        if owns_ray:
            ray.shutdown()
    bytes_figures = measured["bytes"]
    return {
        "intermediate_size": THIN_INTERMEDIATE_SIZE,
        "throughput_tokens": thin.throughput_tokens,
        "by_transport": {
            name: {
                "t1_p50_ms": figures["t1_latency_ms"]["p50"],
                "tokens_per_s": figures["tokens_per_s"],
                "internal_wire_bytes_per_token": figures.get("internal_wire_bytes_per_token", 0.0),
                "rows_received_by": arrived[name],
                "t1_p50_over_bytes": figures["t1_latency_ms"]["p50"] / bytes_figures["t1_latency_ms"]["p50"],
                "tokens_per_s_over_bytes": figures["tokens_per_s"] / bytes_figures["tokens_per_s"],
            }
            for name, figures in measured.items()
        },
    }
