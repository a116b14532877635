"""Planning command: `moe-serve plan`, node-aware expert placement from observed loads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from moe_serve.cli.commands.common import app, console


@app.command(rich_help_panel="Tools")
def plan(
    loads: Annotated[Path, typer.Option(help="Observed load per expert: a .npy float array [layers, experts].")],
    nodes: Annotated[int, typer.Option(help="Nodes; GPU g sits on node g // gpus-per-node.")],
    gpus_per_node: Annotated[int, typer.Option(help="GPUs per node.")],
    slots_per_gpu: Annotated[int, typer.Option(help="Expert slots per GPU.")],
    json_path: Annotated[Path, typer.Option("--json", help="Where to write the plan (JSON).")],
    groups: Annotated[
        int | None,
        typer.Option(help="Expert groups (consecutive ids), kept on one node where balance allows; default: none."),
    ] = None,
    node_slack: Annotated[
        float, typer.Option(help="Load a node may carry above its fair share before it spills to another node.")
    ] = 0.01,
    shared: Annotated[
        int, typer.Option(help="Shared experts: the last columns of the loads; every GPU holds each of them.")
    ] = 0,
) -> None:
    """Place every layer's experts on GPUs: balanced GPU load, each group's load on one node where possible.

    The JSON holds "placement" [layer][gpu] -> expert ids in its slots, "replica_shares" (same shape:
    the share of its expert's rows each slot takes, summing to 1 per expert; the router splits rows so)
    and "figures": mean and worst-layer max/mean GPU load, locality (per group, the share of its load
    served on the node serving most of it, weighted by load), and the seconds the plan took.
    """
    import numpy as np

    from moe_serve.cluster.placement_figures import check_plan
    from moe_serve.cluster.placement_planner import ClusterShape, plan_placement_layers

    try:
        matrix = np.load(loads)
        shape = ClusterShape.uniform(nodes, gpus_per_node, slots_per_gpu)
        result = plan_placement_layers(np.asarray(matrix, dtype=float), shape, groups, node_slack, shared)
        check_plan(result.layers, matrix.shape[1], slots_per_gpu)
    except (ValueError, OSError) as error:
        console.print(f"[red]error[/red]: {error}")
        raise typer.Exit(2) from None
    document = {
        "cluster": {"nodes": nodes, "gpus_per_node": gpus_per_node, "slots_per_gpu": slots_per_gpu},
        "groups": groups,
        "shared": shared,
        "node_slack": node_slack,
        **result.to_json(),
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(document))
    figures = result.figures
    table = Table(title=f"plan for {matrix.shape[0]} layers x {matrix.shape[1]} experts")
    for column in ("mean max/mean", "worst layer", "locality", "time (s)"):
        table.add_column(column)
    table.add_row(
        f"{figures['mean_max_over_mean']:.4f}",
        f"{figures['worst_layer_max_over_mean']:.4f}",
        f"{figures['locality']:.2%}",
        f"{figures['seconds']:.2f}",
    )
    Console().print(table)
    console.print(f"written: {json_path}")
