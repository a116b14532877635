"""PNG plots of a benchmark result (the JSON `moe-serve bench` writes): throughput against T, T=1 latency CDF.

Works from the JSON alone, so any stored result can be plotted again (`moe-serve bench --plot-only
FILE`). Uses matplotlib's object API on the Agg canvas: no pyplot state, no display needed.
Results written before the sweep existed still plot: throughput then shows the core T points only.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

LABELS = {
    "served": "moe-serve (gRPC stack)",
    "reference-eager": "transformers in-process (eager)",
    "reference-grouped_mm": "transformers in-process (grouped_mm)",
    "rayserve": "Ray Serve (handles)",
    "echo": "bare gRPC echo",
    "monolithic": "monolithic KServe peer (one process)",
}
STYLES = {
    "served": {"color": "tab:blue", "marker": "o"},
    "reference-eager": {"color": "tab:green", "marker": "s", "linestyle": "--"},
    "reference-grouped_mm": {"color": "tab:olive", "marker": "^", "linestyle": "--"},
    "rayserve": {"color": "tab:red", "marker": "D"},
    "echo": {"color": "tab:gray", "linestyle": ":"},
    "monolithic": {"color": "tab:purple", "marker": "v", "linestyle": "-."},
}
# the CDF shows the core run's samples; the served samples taken beside Ray Serve repeat "served"
CDF_SUBJECTS = ("served", "monolithic", "reference-eager", "reference-grouped_mm", "rayserve", "echo")


def shape_line(result: dict[str, Any]) -> str:
    config = result["config"]
    return (
        f"d={config['hidden_size']} d_ff={config['intermediate_size']} E={config['num_experts']} "
        f"k={config['top_k']} {config['dtype']}, {config['workers']} workers"
    )


def machine_line(result: dict[str, Any]) -> str:
    machine = result["machine"]
    return machine.get("description") or f"{machine['cpu']}, {machine['cores']} cores, {machine.get('gpu') or 'no GPU'}"


def throughput_series(result: dict[str, Any]) -> dict[str, list[tuple[int, float]]]:
    """{subject: [(T, tokens/s), ...]}: the sweep, else the core run's T=1 and large-T figures."""
    if result.get("throughput_sweep"):
        return {
            name: [(row["tokens"], row["tokens_per_s"]) for row in rows]
            for name, rows in result["throughput_sweep"].items()
        }
    large = result["config"]["throughput_tokens"]
    core = {"served": result["served"]}
    core.update({f"reference-{name}": result["reference"][name] for name in ("eager", "grouped_mm")})
    return {
        name: [(1, 1000 / values["t1_latency_ms"]["p50"]), (large, values["tokens_per_s"])]
        for name, values in core.items()
    }


def tokens_label(tokens: int) -> str:
    """1024 -> "1K": neighbouring powers of two stay readable on the log2 axis (8K beside 16K)."""
    return f"{tokens // 1024}K" if tokens >= 1024 and tokens % 1024 == 0 else str(tokens)


def throughput_figure(result: dict[str, Any]) -> Figure:
    figure = Figure(figsize=(8, 5.2))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    series = throughput_series(result)
    for name, points in series.items():
        tokens, rates = zip(*points, strict=True)
        axes.plot(tokens, rates, label=f"{LABELS.get(name, name)}, 1 client", **STYLES.get(name, {}))
    concurrent = result.get("rayserve", {}).get("concurrent")
    if concurrent:
        for name in ("served", "rayserve"):
            axes.plot(
                [concurrent["tokens"]],
                [concurrent[name]["tokens_per_s"]],
                linestyle="none",
                marker="*",
                markersize=14,
                color=STYLES[name]["color"],
                label=f"{LABELS[name]}, {concurrent['clients']} clients",
            )
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    ticks = sorted({t for points in series.values() for t, _ in points})
    axes.set_xticks(ticks, [tokens_label(t) for t in ticks])
    axes.set_xlabel("tokens per request (T)")
    axes.set_ylabel("tokens/s")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    axes.set_title(f"MoE layer throughput vs T - {shape_line(result)}\n{machine_line(result)}", fontsize=10)
    return figure


def latency_cdf_figure(result: dict[str, Any]) -> Figure:
    """CDF of T=1 latencies; needs the raw samples (results from before they were kept have none)."""
    samples = result.get("t1_samples_ms") or {}
    present = [name for name in CDF_SUBJECTS if samples.get(name)]
    if not present:
        raise ValueError("this result has no raw T=1 latency samples (t1_samples_ms) to plot")
    figure = Figure(figsize=(8, 5.2))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for name in present:
        ordered = sorted(samples[name])
        share = [(i + 1) / len(ordered) for i in range(len(ordered))]
        median = statistics.median(ordered)
        style = {key: value for key, value in STYLES.get(name, {}).items() if key != "marker"}
        axes.step(ordered, share, where="post", label=f"{LABELS.get(name, name)} (p50 {median:.2f} ms)", **style)
    axes.set_xscale("log")
    axes.set_xlabel("latency at T=1 (ms)")
    axes.set_ylabel("share of requests")
    axes.set_ylim(0, 1.01)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    axes.set_title(f"T=1 latency CDF - {shape_line(result)}\n{machine_line(result)}", fontsize=10)
    return figure


def write_plots(result: dict[str, Any], output_dir: Path, stem: str = "latest") -> list[Path]:
    """Write `<stem>-throughput.png`, and when their data exist `<stem>-latency-cdf.png` and
    `<stem>-placement.png`; returns the paths."""
    output_dir.mkdir(parents=True, exist_ok=True)
    figures = {"throughput": throughput_figure(result)}
    if result.get("t1_samples_ms"):
        figures["latency-cdf"] = latency_cdf_figure(result)
    if result.get("placement"):
        from moe_serve.bench.placement_report import placement_figure

        figures["placement"] = placement_figure(result["placement"])
    paths = []
    for name, figure in figures.items():
        path = output_dir / f"{stem}-{name}.png"
        figure.savefig(path, dpi=110, bbox_inches="tight")
        paths.append(path)
    return paths


def plot_result_file(path: Path) -> list[Path]:
    """Plots of a stored result, beside it: `latest.json` -> `latest-throughput.png`, ..."""
    return write_plots(json.loads(path.read_text()), path.parent, path.stem)
