"""The thin-expert section: the served stack against the monolithic peer with nothing to compute.

Same shape as the bench's checkpoint but experts of intermediate size 8, so the comparison isolates
the data path (hops, encoding, combine) from expert compute: on a GPU the experts are nearly free,
and this is what its user feels. Monolithic, served and echo are measured interleaved (T=1 p50 and
large-T tokens/s), then the served stack's messages and hops are counted as in the core run.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import grpc
import torch

from moe_serve.bench.monolithic import spawn_monolithic
from moe_serve.bench.reference import reference_block
from moe_serve.bench.runner import (
    BenchConfig,
    bench_checkpoint,
    echo_subject,
    fast_path_section,
    kserve_subject,
    measure_interleaved,
    reference_subjects,
    served_stacks,
    served_subject,
)
from moe_serve.checkpoint import Checkpoint
from moe_serve.cluster.launcher import init_ray
from moe_serve.cluster.processes import spawn_service_process
from moe_serve.config import DEFAULT_MAX_MESSAGE_BYTES
from moe_serve.runtime.grpc_utils import channel_options

THIN_INTERMEDIATE_SIZE = 8


def thin_section(config: BenchConfig, inputs: dict[int, torch.Tensor]) -> dict[str, Any]:
    """Monolithic vs served vs echo on the thin checkpoint (`inputs` as the core run's); starts and
    stops its own stacks, peer and echo on the running Ray (run_bench's, or a local one it starts
    and stops when none runs)."""
    import ray

    thin = replace(config, intermediate_size=THIN_INTERMEDIATE_SIZE)
    checkpoint_dir = bench_checkpoint(thin)
    options = channel_options(DEFAULT_MAX_MESSAGE_BYTES)
    checkpoint = Checkpoint(checkpoint_dir)
    device = torch.device(config.device)
    # the in-process block the monolithic peer runs, to tell its client hop from its compute
    block = reference_block(checkpoint, 0, "eager", checkpoint.spec.dtype).to(device)
    reference_inputs = {tokens: hidden.to(device) for tokens, hidden in inputs.items()}
    owns_ray = not ray.is_initialized()
    if owns_ray:
        init_ray(log_to_driver=False)
    # the peers start now, while both stacks launch side by side
    echo = spawn_service_process("echo", [], module="moe_serve.bench.echo")
    monolithic = spawn_monolithic(checkpoint_dir, config.device)
    try:
        with (
            served_stacks(thin, checkpoint_dir, lambda: (echo.wait_ready(), monolithic.wait_ready())) as stacks,
            grpc.insecure_channel(echo.address) as echo_channel,
            grpc.insecure_channel(monolithic.address, options=options) as monolithic_channel,
        ):
            served = [
                (served_subject(stack, channel, thin, inputs, name=name), stack)
                for name, (stack, channel) in stacks.items()
            ]
            model_name = stacks["served"][0].model_name
            subjects = [
                *reference_subjects({"eager": block}, thin, reference_inputs),
                *(subject for subject, _ in served),
                kserve_subject("monolithic", model_name, monolithic_channel, thin, inputs),
                echo_subject(echo.address, echo_channel),
            ]
            measured = measure_interleaved(subjects, thin)
            section = fast_path_section(measured, served, thin, checkpoint_dir)
    finally:
        monolithic.stop()
        echo.stop()
        if owns_ray:
            ray.shutdown()
    section["intermediate_size"] = THIN_INTERMEDIATE_SIZE
    section["internal_wire_bytes_per_token"] = measured["served"].get("internal_wire_bytes_per_token")
    return section
