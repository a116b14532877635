"""The placement benchmark section: EPLB's policies reimplemented, the table and the plot, on a small shape."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rich.console import Console

from moe_serve.bench.eplb_reference import balanced_packing, eplb_layer, replicate_experts
from moe_serve.bench.placement import placement_comparison
from moe_serve.bench.placement_report import print_placement_report, write_placement_plot
from moe_serve.cluster.placement_figures import check_plan, plan_figures
from moe_serve.cluster.placement_planner import ClusterShape, group_of_experts


def test_balanced_packing_gives_every_pack_the_same_count() -> None:
    weights = np.array([9.0, 1.0, 5.0, 5.0, 3.0, 7.0])
    index = balanced_packing(weights, 3)
    assert np.bincount(index).tolist() == [2, 2, 2]
    assert index[0] != index[5]  # the two heaviest go to different packs


def test_replicate_experts_gives_extra_replicas_to_the_highest_load_per_replica() -> None:
    logical, counts = replicate_experts(np.array([10.0, 1.0, 4.0]), 6)
    assert counts.tolist() == [4, 1, 1] or counts.tolist() == [3, 1, 2]
    assert len(logical) == 6 and np.bincount(logical, minlength=3).tolist() == counts.tolist()


def test_hierarchical_keeps_every_group_on_one_node_and_global_does_not_need_to() -> None:
    loads = np.random.default_rng(0).lognormal(0, 1.2, size=(4, 64))
    shape = ClusterShape.uniform(2, 4, 9)
    groups = group_of_experts(64, 4)
    hierarchical = [eplb_layer(layer, shape, 4, hierarchical=True) for layer in loads]
    check_plan(hierarchical, 64, 9, distinct=False)
    assert abs(plan_figures(loads, hierarchical, shape, groups)["locality"] - 1.0) < 1e-12
    global_policy = [eplb_layer(layer, shape, 4, hierarchical=False) for layer in loads]
    check_plan(global_policy, 64, 9, distinct=False)
    assert plan_figures(loads, global_policy, shape, groups)["mean_max_over_mean"] < 1.1


def test_section_table_and_plot(tmp_path: Path) -> None:
    trace = tmp_path / "trace.npy"
    np.save(trace, np.random.default_rng(1).integers(0, 100, size=(2, 32)).astype(float))
    section = placement_comparison(
        nodes=2,
        gpus_per_node=2,
        slots_per_gpu=9,
        num_groups=4,
        layers=3,
        experts=32,
        trace=trace,
        trace_shape=(2, 2, 9, 4),
    )
    assert {row["policy"] for row in section["rows"]} == {
        "eplb-hierarchical",
        "eplb-global",
        "greedy-node-first",
        "planner",
    }
    assert {row["loads"] for row in section["rows"]} == {
        "lognormal-0.8",
        "lognormal-1.2",
        "zipf-1.0",
        "trace:trace.npy",
    }
    console = Console(record=True, width=140)
    print_placement_report(section, console)
    assert "eplb-hierarchical" in console.export_text()
    assert write_placement_plot(section, tmp_path / "placement.png").stat().st_size > 1000
