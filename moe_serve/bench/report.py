"""Prints the benchmark result as a table with its targets."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from moe_serve.bench.placement_report import print_placement_report
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


def print_transports_report(result: BenchResult, console: Console) -> None:
    r = result.transports
    if not r:
        return
    table = Table(
        title=f"the compute hop's rows by transport (thin experts, router in the gateway), alternating rounds; "
        f"tokens/s at T={r['throughput_tokens']}"
    )
    for column in ("transport", "T=1 p50 (ms)", "tokens/s", "vs bytes: p50 / tok/s", "rows arrived by"):
        table.add_column(column)
    for name, figures in r["by_transport"].items():
        table.add_row(
            name,
            f"{figures['t1_p50_ms']:.2f}",
            f"{figures['tokens_per_s']:,.0f}",
            f"{figures['t1_p50_over_bytes']:.2f}x / {figures['tokens_per_s_over_bytes']:.2f}x",
            ", ".join(f"{how} {rows:,.0f}" for how, rows in sorted(figures["rows_received_by"].items())),
        )
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


def _served_columns(fast_path: dict[str, dict]) -> list[tuple[str, str]]:
    """(section, served subject) pairs, in order: standard then thin; served then served-embedded."""
    return [(section, name) for section, figures in fast_path.items() for name in figures["ratios"]]


def print_fast_path_report(result: BenchResult, console: Console) -> None:
    """Issue 22: served against the monolithic KServe peer, messages per T=1 request, hop breakdown."""
    fast_path = result.fast_path
    if not fast_path:
        return
    t = result.config["throughput_tokens"]
    table = Table(
        title="Fast path (issue 22): served vs the monolithic KServe v2 peer (one process, sync gRPC, the "
        "transformers block), same client, interleaved"
    )
    for column in ("checkpoint", "subject", "T=1 p50 / p99 ms", f"tok/s T={t}", "p50 x peer", "tok/s x peer"):
        table.add_column(column)
    table.add_column("p50 gap (echoes)")
    for section, figures in fast_path.items():
        label = f"{section} ({figures['checkpoint']})"
        for name, latency in figures["t1_latency_ms"].items():
            ratios = figures["ratios"].get(name, {})
            rate = figures["tokens_per_s"].get(name)
            table.add_row(
                label,
                name,
                f"{latency['p50']:.2f} / {latency['p99']:.2f}",
                "" if rate is None else f"{rate:.0f}",
                f"{ratios['t1_p50_over_monolithic']:.2f}x" if ratios else "",
                f"{ratios['tokens_per_s_over_monolithic']:.2f}x" if "tokens_per_s_over_monolithic" in ratios else "",
                f"{ratios['t1_gap_ms']:+.2f} ms = {ratios['t1_gap_in_echoes']:.1f}" if ratios else "",
            )
            label = ""
        table.add_row("", "echo", f"{figures['echo_p50_ms']:.3f}", "", "", "", "1 echo")
    console.print(table)
    print_messages_table(fast_path, console)
    print_hops_table(fast_path, console)


def print_messages_table(fast_path: dict[str, dict], console: Console) -> None:
    columns = _served_columns(fast_path)
    table = Table(title="messages per T=1 request (internal streams counted at their sender, from /metrics)")
    table.add_column("message")
    table.add_column("hop")
    for section, name in columns:
        table.add_column(f"{section}: {name}")
    kinds: dict[str, str] = {}
    for section, name in columns:
        for kind, entry in fast_path[section]["messages"][name]["by_type"].items():
            kinds.setdefault(kind, entry["hop"])
    for kind, hop in kinds.items():
        cells = [fast_path[s]["messages"][n]["by_type"].get(kind, {}).get("per_request", 0.0) for s, n in columns]
        table.add_row(kind, hop, *(f"{value:.2f}" for value in cells))
    totals = [fast_path[s]["messages"][n] for s, n in columns]
    table.add_row("messages per T=1 request", "", *(f"{m['per_t1_request']:.2f}" for m in totals))
    table.add_row("sent but not received", "", *(str(m["unmatched"] or "none") for m in totals))
    console.print(table)


def print_hops_table(fast_path: dict[str, dict], console: Console) -> None:
    """Means over the probed T=1 requests (ms); the monolithic and echo p50s beside, from the interleaved run."""
    columns = _served_columns(fast_path)
    table = Table(title="where a T=1 request's time goes (ms; served: means over the probed requests)")
    table.add_column("hop")
    for section, name in columns:
        table.add_column(f"{section}: {name}")
    for section in fast_path:
        table.add_column(f"{section}: monolithic")
    table.add_column("echo p50")
    hops = [fast_path[s]["hops"][n] for s, n in columns]
    peers = [fast_path[s]["monolithic"] for s in fast_path]

    def row(label: str, served: list, peer: list | None = None, echo: str = "") -> None:
        cells = [f"{value:.3f}" if isinstance(value, float) else value for value in served]
        peer_cells = [f"{value:.3f}" if isinstance(value, float) else value for value in peer or [""] * len(peers)]
        table.add_row(label, *cells, *peer_cells, echo)

    echo = ", ".join(f"{fast_path[s]['echo_p50_ms']:.3f}" for s in fast_path)
    row(
        "client round trip (p50 / mean)",
        [f"{h['client_ms']['p50']:.3f} / {h['client_ms']['mean']:.3f}" for h in hops],
        [f"{fast_path[s]['t1_latency_ms']['monolithic']['p50']:.3f} (p50)" for s in fast_path],
    )
    row(
        "client <-> gateway (client - gateway total)",
        [h.get("client_to_gateway_ms", "") for h in hops],
        [p["client_hop_ms"] for p in peers],
        echo,
    )
    labels = {
        "decode": "gateway decode",
        "route": "route (gateway -> router -> plan)",
        "collect": "collect (workers, deliveries)",
        "combine": "combine",
        "encode": "encode",
        "total": "gateway total",
    }
    for stage, label in labels.items():
        row(label, [h["gateway_ms"].get(stage, "") for h in hops])
    row("gateway other (admission, split)", [h.get("gateway_other_ms", "") for h in hops])
    row(
        "expert compute per call x calls",
        [
            f"{h['expert_compute_ms_per_call']:.3f} x {h['expert_calls_per_request']:.2f}"
            if "expert_compute_ms_per_call" in h
            else ""
            for h in hops
        ],
        [f"{p['in_process_block_p50_ms']:.3f} (block p50)" for p in peers],
    )
    console.print(table)


def bench_report(result: BenchResult, console: Console) -> None:
    """Every table of a benchmark result, core comparison first."""
    print_report(result, console)
    print_fast_path_report(result, console)
    print_gpu_report(result, console)
    print_rayserve_report(result, console)
    print_sweep_report(result, console)
    print_routing_report(result, console)
    print_replication_report(result, console)
    print_offload_report(result, console)
    print_internal_auth_report(result, console)
    print_transports_report(result, console)
    print_placement_report(result.placement, console)
