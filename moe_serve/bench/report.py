"""Prints the benchmark result as a table with its targets."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from moe_serve.bench.runner import BenchResult


def print_report(result: BenchResult, console: Console) -> None:
    config, reference, served, ratios = result.config, result.reference, result.served, result.ratios
    best = reference[reference["best_throughput"]]
    fastest = reference[reference["best_t1"]]
    table = Table(
        title=f"moe-serve bench: d={config['hidden_size']} d_ff={config['intermediate_size']} "
        f"E={config['num_experts']} k={config['top_k']} {config['dtype']}, "
        f"{config['workers']} workers - {result.machine['cpu']} x{result.machine['cores']}"
    )
    for column in ("measure", "served", "in-process", "ratio / target"):
        table.add_column(column)
    t = config["throughput_tokens"]
    ratio = ratios["throughput_served_over_reference"]
    table.add_row(
        f"tokens/s at T={t}",
        f"{served['tokens_per_s']:.0f}",
        f"{best['tokens_per_s']:.0f} ({reference['best_throughput']})",
        f"{ratio:.2f}x (target >= 0.8x)",
    )
    s1, r1 = served["t1_latency_ms"], fastest["t1_latency_ms"]
    table.add_row(
        "T=1 latency p50 / p99 (ms)",
        f"{s1['p50']:.2f} / {s1['p99']:.2f}",
        f"{r1['p50']:.2f} / {r1['p99']:.2f} ({reference['best_t1']})",
        f"hops {ratios['t1_hop_cost_ms']:.2f} ms = {ratios['t1_hop_cost_in_echoes']:.1f} echoes (target <= 4)",
    )
    echo = result.echo["latency_ms"]
    table.add_row("bare gRPC echo p50 (ms)", f"{echo['p50']:.3f}", "", f"{result.echo['payload_bytes']} B payload")
    table.add_row(
        "internal wire bytes / token",
        f"{served['internal_wire_bytes_per_token']:.0f}",
        "",
        f"{ratios['wire_bytes_over_ideal']:.3f}x of (1+2k)*d*size (target <= 1.05x)",
    )
    for service, memory in result.memory_mib.items():
        table.add_row(f"RSS {service} (MiB)", f"{memory['rss']:.0f}", "", f"target <= {memory['target']:.0f}")
    console.print(table)


def print_routing_report(result: BenchResult, console: Console) -> None:
    if result.concurrency:
        table = Table(title=f"concurrency sweep, T=64 per request ({result.config['workers']} workers)")
        for column in ("clients", "batching", "tokens/s", "p50 ms", "p99 ms"):
            table.add_column(column)
        for mode, rows in result.concurrency.items():
            for row in rows:
                latency = row["latency_ms"]
                table.add_row(
                    str(row["clients"]),
                    mode.removeprefix("batching_"),
                    f"{row['tokens_per_s']:.0f}",
                    f"{latency['p50']:.1f}",
                    f"{latency['p99']:.1f}",
                )
        console.print(table)
    if result.capacity:
        hot = result.capacity[0]["hot_expert_share"]
        table = Table(title=f"capacity on a skewed router (expert 0 takes {hot:.0%} of slots), T=256")
        for column in ("capacity factor", "drop: dropped", "reroute: rerouted", "reroute: dropped"):
            table.add_column(column)
        for row in result.capacity:
            table.add_row(
                f"{row['capacity_factor']:.2f}",
                f"{row['drop_dropped_share']:.1%}",
                f"{row['reroute_rerouted_share']:.1%}",
                f"{row['reroute_dropped_share']:.1%}",
            )
        console.print(table)


def print_replication_report(result: BenchResult, console: Console) -> None:
    r = result.replication
    if not r:
        return
    table = Table(
        title=f"skewed load on {r['workers']} workers: expert 0 gets {r['hot_expert_row_share']:.0%} of "
        f"rows, T={r['tokens_per_request']}; EPLB gives it {r['hot_expert_replicas']} replicas, "
        f"max/mean worker load {r['imbalance_before']:.2f} -> {r['imbalance_after']:.2f}"
    )
    for column in (
        "clients",
        "one replica: tok/s",
        "p99 ms",
        "replicated: tok/s",
        "p99 ms",
        "throughput x",
        "p99 x (better)",
    ):
        table.add_column(column)
    for run in r["runs"]:
        before, after = run["without_replication"], run["with_replication"]
        table.add_row(
            str(run["clients"]),
            f"{before['tokens_per_s']:.0f}",
            f"{before['latency_ms']['p99']:.0f}",
            f"{after['tokens_per_s']:.0f}",
            f"{after['latency_ms']['p99']:.0f}",
            f"{run['throughput_gain']:.2f}",
            f"{run['p99_gain']:.2f}",
        )
    console.print(table)
    console.print("targets: throughput x >= 1.3, p99 x >= 1.5")


def print_offload_report(result: BenchResult, console: Console) -> None:
    r = result.offload
    if not r:
        return
    table = Table(
        title=f"expert offloading: device budget per worker, T={r['tokens_per_request']} per request, "
        f"{r['passes']} passes through MoE layers {r['moe_layers']}, one client"
    )
    for column in ("trace", "budget", "prefetch", "tok/s", "p50 ms", "p99 ms", "hit rate", "moved B/token"):
        table.add_column(column)
    for run in r["runs"]:
        table.add_row(
            run["trace"],
            f"{run['budget']:.0%}",
            "on" if run["prefetch"] else "off",
            f"{run['tokens_per_s']:.0f}",
            f"{run['latency_ms']['p50']:.1f}",
            f"{run['latency_ms']['p99']:.1f}",
            f"{run['hit_rate']:.0%}",
            f"{run['bytes_moved_per_token']:,.0f}",
        )
    console.print(table)


def print_internal_auth_report(result: BenchResult, console: Console) -> None:
    r = result.internal_auth
    if not r:
        return
    table = Table(
        title="authenticated internal hops: p50 round trip (µs) against an echo process, and cost over plaintext"
    )
    shapes = list(r["p50_us"]["plaintext"])
    for column in ("mode", *shapes):
        table.add_column(column.replace("_", " ") + " B")
    for mode, figures in r["p50_us"].items():
        extra = r["cost_over_plaintext_us"].get(mode, {})
        table.add_row(mode, *(f"{figures[s]:.0f}" + (f" ({extra[s]:+.0f})" if s in extra else "") for s in shapes))
    console.print(table)


def print_rayserve_report(result: BenchResult, console: Console) -> None:
    r, ratios = result.rayserve, result.ratios
    if not r:
        return
    concurrent, t1 = r["concurrent"], r["t1_latency_ms"]
    table = Table(
        title=f"served vs the same layer as Ray Serve deployments ({r['transport']}), alternating rounds; "
        f"Ray Serve output = transformers block within {r['max_abs_diff_vs_reference']:.1e}, "
        f"started in {r['startup_s']:.0f} s"
    )
    for column in ("measure", "served", "Ray Serve", "ratio / target"):
        table.add_column(column)
    table.add_row(
        f"tokens/s at T={concurrent['tokens']}, {concurrent['clients']} clients",
        f"{concurrent['served']['tokens_per_s']:.0f}",
        f"{concurrent['rayserve']['tokens_per_s']:.0f}",
        f"{ratios['concurrent_throughput_served_over_rayserve']:.2f}x (target >= 1.5x)",
    )
    table.add_row(
        f"  p50 / p99 (ms), {concurrent['clients']} clients",
        f"{concurrent['served']['latency_ms']['p50']:.1f} / {concurrent['served']['latency_ms']['p99']:.1f}",
        f"{concurrent['rayserve']['latency_ms']['p50']:.1f} / {concurrent['rayserve']['latency_ms']['p99']:.1f}",
        "",
    )
    table.add_row(
        "T=1 latency p50 / p99 (ms)",
        f"{t1['served']['p50']:.2f} / {t1['served']['p99']:.2f}",
        f"{t1['rayserve']['p50']:.2f} / {t1['rayserve']['p99']:.2f}",
        f"{ratios['t1_p50_served_over_rayserve']:.2f}x (target <= 0.5x)",
    )
    if "rss_mib" in r:
        table.add_row("RSS, whole layer (MiB)", f"{r['rss_mib']['served']:.0f}", f"{r['rss_mib']['rayserve']:.0f}", "")
    console.print(table)


def print_tokens_table(title: str, points: dict[str, list[dict]], console: Console) -> None:
    """One row per T, one column per subject: tokens/s."""
    if not points:
        return
    names = list(points)
    table = Table(title=title)
    table.add_column("T")
    for name in names:
        table.add_column(name)
    tokens = [row["tokens"] for row in points[names[0]]]
    for index, count in enumerate(tokens):
        table.add_row(str(count), *(f"{points[name][index]['tokens_per_s']:.0f}" for name in names))
    console.print(table)


def print_sweep_report(result: BenchResult, console: Console) -> None:
    print_tokens_table("single-client tokens/s against T (alternating rounds)", result.throughput_sweep, console)
    print_tokens_table(
        "gateway pipelining: single-client tokens/s, whole requests vs chunks", result.pipelining, console
    )


def print_gpu_report(result: BenchResult, console: Console) -> None:
    gpu = result.gpu
    if not gpu:
        return
    table = Table(
        title=f"{gpu['device']}, {gpu['dtype']}: share of the measured matmul peak "
        f"({gpu['peak_matmul_tflops']:.0f} TFLOP/s at {gpu['peak_matmul_size']}^3); "
        f"{gpu['flops_per_token'] / 1e6:.1f} MFLOP per token"
    )
    for column in ("subject", "T", "tokens/s", "TFLOP/s", "of peak"):
        table.add_column(column)

    def add(subject: str, tokens: int, figures: dict) -> None:
        rate, tflops, share = figures["tokens_per_s"], figures["tflops"], figures["fraction_of_peak"]
        table.add_row(subject, str(tokens), f"{rate:.0f}", f"{tflops:.2f}", f"{share:.2%}")

    for name in ("served", "reference"):
        add(name, result.config["throughput_tokens"], gpu[name])
    for name, points in gpu["sweep"].items():
        best = max(points, key=lambda point: point["tokens_per_s"])
        add(f"{name} (sweep, best T)", best["tokens"], best)
    console.print(table)


def bench_report(result: BenchResult, console: Console) -> None:
    """Every table of a benchmark result, core comparison first."""
    print_report(result, console)
    print_gpu_report(result, console)
    print_rayserve_report(result, console)
    print_sweep_report(result, console)
    print_routing_report(result, console)
    print_replication_report(result, console)
    print_offload_report(result, console)
    print_internal_auth_report(result, console)
