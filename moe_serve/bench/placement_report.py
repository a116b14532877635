"""The placement section's table (rich) and its plot: GPU balance against group locality per policy.

Both work from the section's JSON alone (`placement_comparison`'s dict), so a stored result can be
shown again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich.console import Console
from rich.table import Table

MARKERS = {"eplb-hierarchical": "s", "eplb-global": "D", "greedy-node-first": "^", "planner": "o"}


def shape_text(section: dict[str, Any]) -> str:
    cluster = section["cluster"]
    return (
        f"{cluster['nodes']} nodes x {cluster['gpus_per_node']} GPUs x {cluster['slots_per_gpu']} slots, "
        f"{section['experts']} experts in {section['groups']} groups, {section['layers']} layers, "
        f"seed {section['seed']}"
    )


def print_placement_report(section: dict[str, Any], console: Console) -> None:
    """One row per (load matrix, policy): mean and worst-layer max/mean GPU load, locality, time."""
    if not section:
        return
    table = Table(title=f"expert placement: {shape_text(section)}")
    for column in ("loads", "policy"):
        table.add_column(column, no_wrap=True)
    for column in ("mean max/mean", "worst layer", "locality", "time (s)"):
        table.add_column(column, justify="right")
    for row in section["rows"]:
        table.add_row(
            row["loads"],
            row["policy"],
            f"{row['mean_max_over_mean']:.3f}",
            f"{row['worst_layer_max_over_mean']:.3f}",
            f"{row['locality']:.1%}",
            f"{row['seconds']:.2f}",
        )
    console.print(table)
    if section.get("trace_shape"):
        nodes, gpus, slots, groups = section["trace_shape"]
        console.print(f"trace rows placed on {nodes} nodes x {gpus} GPUs x {slots} slots, {groups} groups")


def placement_figure(section: dict[str, Any]) -> Figure:
    """Mean max/mean GPU load (lower is better) against locality (higher is better), per policy and load."""
    figure = Figure(figsize=(7.5, 5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    loads = sorted({row["loads"] for row in section["rows"]})
    colors = {name: f"C{index}" for index, name in enumerate(loads)}
    for row in section["rows"]:
        axes.scatter(
            row["locality"] * 100,
            row["mean_max_over_mean"],
            marker=MARKERS.get(row["policy"], "x"),
            color=colors[row["loads"]],
            s=55,
        )
    for policy, marker in MARKERS.items():
        axes.scatter([], [], marker=marker, color="black", label=policy)
    for name, color in colors.items():
        axes.scatter([], [], marker="o", color=color, label=name)
    axes.set_xlabel("locality: % of each group's load served on one node")
    axes.set_ylabel("max / mean GPU load (mean over layers)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8, loc="upper left")
    axes.set_title(f"balance against locality\n{shape_text(section)}", fontsize=9)
    return figure


def write_placement_plot(section: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    placement_figure(section).savefig(path, dpi=110, bbox_inches="tight")
    return path
