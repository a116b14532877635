"""Tool commands: `moe-serve init-demo`, `bench`, `soak`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from moe_serve.cli.commands.common import CheckpointDir, app, console, require_extra
from moe_serve.config import GatewaySettings
from moe_serve.runtime.grpc_utils import configure_logging

if TYPE_CHECKING:  # the bench runner imports torch and Ray: only when the command runs
    from moe_serve.bench.runner import BenchConfig

Quiet = Annotated[
    bool,
    typer.Option("--quiet", help="No progress bar on stderr (there is none anyway when stderr is not a terminal)."),
]
# what the optional extras of pyproject.toml bring, by import name
# (ray[serve] adds only packages that ray[default] and the server bring already, bar a few Ray internals)
BENCH_MODULES = ("transformers", "matplotlib")
SOAK_MODULES = ("transformers",)


@app.command("init-demo", rich_help_panel="Tools")
def init_demo(
    directory: Annotated[Path, typer.Argument(help="Where to write the checkpoint.")],
    hidden_size: int = 256,
    intermediate_size: int = 512,
    num_experts: int = 8,
    top_k: int = 2,
    num_layers: int = 2,
    dtype: str = "float32",
    seed: int = 0,
) -> None:
    """Write a small deterministic random Mixtral-layout checkpoint (no download)."""
    from moe_serve.cli.demo import DemoShape, write_demo_checkpoint

    shape = DemoShape(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_experts=num_experts,
        top_k=top_k,
        num_layers=num_layers,
        dtype=dtype,
        seed=seed,
    )
    try:
        path = write_demo_checkpoint(directory, shape)
    except ValueError as error:
        console.print(f"[red]error[/red]: {error}")
        raise typer.Exit(2) from None
    console.print(
        f"wrote demo checkpoint to {path} ({num_layers} MoE layers, {num_experts} experts, top-{top_k}, "
        f"d={hidden_size}, d_ff={intermediate_size}, {dtype})"
    )


def parse_tokens(text: str) -> tuple[int, ...]:
    """Parse "1,16,256" into (1, 16, 256); anything but positive whole numbers is a ValueError."""
    try:
        tokens = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        tokens = ()
    if not tokens or min(tokens) < 1:
        raise ValueError(f"--sweep-tokens takes positive whole numbers separated by commas, not {text!r}")
    return tokens


@app.command(rich_help_panel="Tools")
def bench(
    hidden_size: int = 1024,
    intermediate_size: int = 2816,
    num_experts: int = 8,
    top_k: int = 2,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
    workers: Annotated[int, typer.Option(help="Expert workers of the served stack.")] = 2,
    device: Annotated[
        str, typer.Option(help="cpu, or cuda: workers share the GPU and the in-process reference runs on it.")
    ] = "cpu",
    pipeline_chunk_tokens: Annotated[
        int, typer.Option(help=GatewaySettings.model_fields["pipeline_chunk_tokens"].description)
    ] = 0,
    latency_requests: Annotated[int, typer.Option(help="Requests timed at T=1.")] = 200,
    throughput_tokens: Annotated[int, typer.Option(help="T of the throughput requests.")] = 2048,
    throughput_requests: Annotated[int, typer.Option(help="Requests timed for throughput.")] = 10,
    fast_path_requests: Annotated[
        int, typer.Option(help="T=1 requests whose messages and gateway stages are counted (from /metrics).")
    ] = 100,
    rounds: Annotated[int, typer.Option(help="Alternating measurement rounds.")] = 5,
    sweep_tokens: Annotated[
        str | None,
        typer.Option(
            help="T values of the throughput sweep, comma-separated (default 1 to 2048; a GPU fills at larger T)."
        ),
    ] = None,
    sections: Annotated[
        str,
        typer.Option(
            help="Extra sections, comma-separated: rayserve, sweep, concurrency, capacity, replication, offload, "
            "auth (cluster token against mutual TLS per internal message), thin (served vs the monolithic peer "
            "with experts of width 8: the data path alone), transports (the same thin stack with rows by shared "
            "memory, NIXL transfers or bytes), pipelining, placement (expert placement policies on synthetic "
            "loads, no stack) ('' for none)."
        ),
    ] = "rayserve,sweep,concurrency,capacity,replication,offload,auth,thin,placement",
    output_dir: Annotated[Path, typer.Option(help="Where the JSON results and PNG plots go.")] = Path(
        "benchmarks/results"
    ),
    plot_only: Annotated[
        Path | None, typer.Option(help="Only redraw the PNG plots of this results JSON (beside it), then exit.")
    ] = None,
    quiet: Quiet = False,
    only: Annotated[
        str | None,
        typer.Option(
            help="Run this one section alone, without a stack: placement (writes placement.json and "
            "placement.png to --output-dir)."
        ),
    ] = None,
    placement_trace: Annotated[
        Path | None,
        typer.Option(help="placement: also place this recorded load matrix (.npy, [layers, experts] rows)."),
    ] = None,
    placement_trace_shape: Annotated[
        str, typer.Option(help="placement: the trace's cluster as nodes,gpus_per_node,slots_per_gpu,groups.")
    ] = "2,4,9,8",
) -> None:
    """Measure the served layer against the in-process transformers block, a gRPC echo and Ray Serve, in one run."""
    require_extra("bench", "bench", BENCH_MODULES if plot_only is None and only is None else ("matplotlib",))
    if only is not None:
        run_section_alone(only, output_dir, placement_trace, placement_trace_shape)
        return
    if plot_only is not None:
        redraw_plots(plot_only)
        return
    from moe_serve.bench.runner import BenchConfig

    configure_logging("WARNING")
    try:
        config = BenchConfig(
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_experts=num_experts,
            top_k=top_k,
            dtype=dtype,
            workers=workers,
            latency_requests=latency_requests,
            throughput_tokens=throughput_tokens,
            throughput_requests=throughput_requests,
            fast_path_requests=fast_path_requests,
            rounds=rounds,
            **({"sweep_tokens": parse_tokens(sweep_tokens)} if sweep_tokens else {}),
            sections=tuple(filter(None, (part.strip() for part in sections.split(",")))),
            output_dir=output_dir,
            device=device,
            pipeline_chunk_tokens=pipeline_chunk_tokens,
        )
    except ValueError as error:
        console.print(f"[red]error[/red]: {error}")
        raise typer.Exit(2) from None
    run_and_report(config, output_dir, quiet)


def redraw_plots(result_file: Path) -> None:
    """`bench --plot-only FILE`: the PNG plots of a results JSON, redrawn beside it."""
    from moe_serve.bench.plots import plot_result_file

    for path in plot_result_file(result_file):
        console.print(f"plot written to {path}")


def run_and_report(config: BenchConfig, output_dir: Path, quiet: bool) -> None:
    """Run the bench with a progress bar per section, print the report, write the JSON and plots."""
    from moe_serve.bench.progress import section_bar
    from moe_serve.bench.report import bench_report
    from moe_serve.bench.runner import bench_sections, run_bench, write_result

    with section_bar(console, "bench", bench_sections(config), quiet) as progress:
        result = run_bench(config, progress)
    bench_report(result, Console())
    for path in write_result(result, output_dir):
        console.print(f"written: {path}")


def run_section_alone(section: str, output_dir: Path, trace: Path | None, trace_shape: str) -> None:
    """`bench --only SECTION`: the sections that need no served stack."""
    import json

    from moe_serve.bench.placement import placement_comparison
    from moe_serve.bench.placement_report import print_placement_report, write_placement_plot

    if section != "placement":
        console.print(f"[red]error[/red]: --only runs the placement section alone, not {section!r}")
        raise typer.Exit(2)
    try:
        nodes, gpus, slots, groups = (int(part) for part in trace_shape.split(","))
    except ValueError:
        console.print(f"[red]error[/red]: --placement-trace-shape takes four numbers, not {trace_shape!r}")
        raise typer.Exit(2) from None
    result = placement_comparison(trace=trace, trace_shape=(nodes, gpus, slots, groups))
    print_placement_report(result, Console())
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "placement.json"
    path.write_text(json.dumps(result, indent=2))
    console.print(f"written: {path}")
    console.print(f"written: {write_placement_plot(result, output_dir / 'placement.png')}")


@app.command(rich_help_panel="Tools")
def soak(
    duration: Annotated[float, typer.Option(help="Seconds of load (the issue's benchmark: 600).")] = 600.0,
    checkpoint: CheckpointDir = None,
    workers: Annotated[int, typer.Option(help="Expert workers of the served stack.")] = 2,
    clients: Annotated[int, typer.Option(help="Concurrent clients sending back to back.")] = 4,
    warmup_fraction: Annotated[float, typer.Option(help="Share of the duration before growth is measured.")] = 0.2,
    sample_interval: Annotated[
        float | None, typer.Option(help="Seconds between resource samples (default: duration/100, 0.5-5 s).")
    ] = None,
    max_tokens: Annotated[int, typer.Option(help="Largest T of a request (T is log-uniform over 1..this).")] = 512,
    seed: int = 0,
    output_dir: Annotated[Path, typer.Option(help="Where the JSON results go.")] = Path("benchmarks/results/soak"),
    quiet: Quiet = False,
) -> None:
    """Mixed load (deadlines and cancellations included) on a fresh stack, every answer checked; fails on
    wrong answers, unexpected failures, or RSS / fd / thread growth of any service after the warm-up."""
    require_extra("soak", "soak", SOAK_MODULES)
    from moe_serve.bench.progress import section_bar
    from moe_serve.bench.soak import SOAK_SECTIONS, SoakConfig, run_soak, write_soak_result
    from moe_serve.bench.soak_load import LoadMix
    from moe_serve.bench.soak_report import print_soak_report
    from moe_serve.hub import resolve_checkpoint
    from moe_serve.runtime.errors import ConfigurationError

    configure_logging("WARNING")
    try:
        config = SoakConfig(
            duration_s=duration,
            checkpoint=None if checkpoint is None else resolve_checkpoint(checkpoint),
            workers=workers,
            clients=clients,
            warmup_fraction=warmup_fraction,
            sample_interval_s=sample_interval,
            seed=seed,
            mix=LoadMix(max_tokens=max_tokens),
        )
        with section_bar(console, f"soak ({duration:g} s of load)", SOAK_SECTIONS, quiet) as sections:
            result = run_soak(config, progress=console.print, sections=sections)
    except (ValueError, ConfigurationError) as error:
        console.print(f"[red]error[/red]: {error}")
        raise typer.Exit(2) from None
    print_soak_report(result, Console())
    for path in write_soak_result(result, output_dir):
        console.print(f"written: {path}")
    if not result.passed:
        raise typer.Exit(1)
