"""The benchmark's PNG plots: written, decodable, not blank, carrying every subject and the machine.

Runs on a small synthetic result shaped like the JSON `moe-serve bench` writes, so no stack starts.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from matplotlib.image import imread
from typer.testing import CliRunner

from moe_serve.bench.plots import latency_cdf_figure, plot_result_file, throughput_figure, write_plots
from moe_serve.cli.main import app

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MACHINE = "Test CPU 9000, 2 cores, no GPU"
TOKENS = (1, 16, 64, 256, 1024, 2048)


def latency(p50: float) -> dict[str, float]:
    return {"p50": p50, "p99": 2 * p50, "mean": 1.1 * p50, "count": 50}


def synthetic_result(sweep: bool = True) -> dict[str, Any]:
    """A result with the core figures and, when `sweep`, the sweep, the Ray Serve section and raw samples."""
    rng = random.Random(0)
    result: dict[str, Any] = {
        "config": {
            "hidden_size": 64,
            "intermediate_size": 96,
            "num_experts": 8,
            "top_k": 2,
            "dtype": "float32",
            "workers": 2,
            "throughput_tokens": 2048,
        },
        "machine": {"cpu": "Test CPU 9000", "cores": 2, "gpu": None, "description": MACHINE},
        "served": {"t1_latency_ms": latency(9.0), "tokens_per_s": 3400.0},
        "reference": {
            "eager": {"t1_latency_ms": latency(4.0), "tokens_per_s": 4300.0},
            "grouped_mm": {"t1_latency_ms": latency(3.6), "tokens_per_s": 4100.0},
        },
    }
    if not sweep:
        return result
    scale = {"served": 1.0, "reference-eager": 1.3, "reference-grouped_mm": 1.2, "rayserve": 0.5}
    result["throughput_sweep"] = {
        name: [{"tokens": t, "tokens_per_s": factor * 3000 * t / (t + 30), "requests": 3} for t in TOKENS]
        for name, factor in scale.items()
    }
    result["rayserve"] = {
        "concurrent": {
            "tokens": 256,
            "clients": 4,
            "served": {"tokens_per_s": 3000.0, "latency_ms": latency(300.0)},
            "rayserve": {"tokens_per_s": 1500.0, "latency_ms": latency(600.0)},
        }
    }
    centres = {"served": 9.0, "reference-eager": 4.0, "reference-grouped_mm": 3.6, "rayserve": 14.0, "echo": 0.4}
    result["t1_samples_ms"] = {
        name: [rng.lognormvariate(0, 0.2) * centre for _ in range(50)] for name, centre in centres.items()
    }
    return result


def assert_valid_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    pixels = imread(path)
    height, width = pixels.shape[:2]
    assert height > 300 and width > 500, f"{path} is only {width}x{height}"
    assert float(pixels.std()) > 0.01, f"{path} is blank"


def legend_labels(figure: Any) -> list[str]:
    return [text.get_text() for text in figure.axes[0].get_legend().get_texts()]


def test_write_plots_writes_both_pngs(tmp_path: Path) -> None:
    paths = write_plots(synthetic_result(), tmp_path, "latest")
    assert [p.name for p in paths] == ["latest-throughput.png", "latest-latency-cdf.png"]
    for path in paths:
        assert_valid_png(path)


def test_throughput_plot_shows_every_subject_and_the_machine() -> None:
    figure = throughput_figure(synthetic_result())
    labels = legend_labels(figure)
    for name in ("moe-serve", "eager", "grouped_mm", "Ray Serve"):
        assert sum(name in label for label in labels) >= 1, f"{name} missing from {labels}"
    assert sum("4 clients" in label for label in labels) == 2
    assert MACHINE in figure.axes[0].get_title()
    # one line per subject with a point per T, plus the two concurrent markers
    assert sorted(len(line.get_xdata()) for line in figure.axes[0].get_lines()) == [1, 1, 6, 6, 6, 6]


def test_latency_cdf_ends_at_one_and_names_each_p50() -> None:
    result = synthetic_result()
    figure = latency_cdf_figure(result)
    labels = legend_labels(figure)
    assert len(labels) == 5 and any(label.startswith("Ray Serve") for label in labels)
    for line in figure.axes[0].get_lines():
        shares = list(line.get_ydata())
        assert shares == sorted(shares) and shares[-1] == pytest.approx(1.0)
    assert MACHINE in figure.axes[0].get_title()


def test_result_without_sweep_or_samples_still_plots_throughput(tmp_path: Path) -> None:
    result = synthetic_result(sweep=False)
    paths = write_plots(result, tmp_path, "old")
    assert [p.name for p in paths] == ["old-throughput.png"]
    assert_valid_png(paths[0])
    with pytest.raises(ValueError, match="no raw T=1 latency samples"):
        latency_cdf_figure(result)


def test_plot_only_redraws_plots_beside_the_json(tmp_path: Path) -> None:
    source = tmp_path / "bench-20260101-000000.json"
    source.write_text(json.dumps(synthetic_result()))
    outcome = CliRunner().invoke(app, ["bench", "--plot-only", str(source)])
    assert outcome.exit_code == 0, outcome.output
    for name in ("bench-20260101-000000-throughput.png", "bench-20260101-000000-latency-cdf.png"):
        assert_valid_png(tmp_path / name)
    assert plot_result_file(source) == [
        tmp_path / "bench-20260101-000000-throughput.png",
        tmp_path / "bench-20260101-000000-latency-cdf.png",
    ]


def test_large_token_counts_get_short_tick_labels() -> None:
    result = synthetic_result()
    for points in result["throughput_sweep"].values():
        points += [{"tokens": t, "tokens_per_s": 3000.0, "requests": 1} for t in (8192, 16384)]
    figure = throughput_figure(result)
    labels = [label.get_text() for label in figure.axes[0].get_xticklabels()]
    assert labels == ["1", "16", "64", "256", "1K", "2K", "8K", "16K"]
