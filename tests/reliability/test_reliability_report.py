"""scripts/reliability_report.py renders every reliability record (and the latest ten-minute soak)
into one row of docs/reliability.md, always in the same order, and refuses a malformed record
loudly: exit status 1, the file named, nothing written."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.helpers import REPOSITORY

ROOT = REPOSITORY
SCRIPT = ROOT / "scripts" / "reliability_report.py"
RECORDS = ROOT / "benchmarks" / "results" / "reliability"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("reliability_report", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


report = load_script()


def record(scenario: str, **changes: Any) -> dict[str, Any]:
    return {
        "scenario": scenario,
        "title": f"Scenario {scenario} | with a pipe",
        "load": "2 clients",
        "faults": "SIGKILL to a worker",
        "succeeded": 10,
        "failed": 2,
        "wrong_answers": 0,
        "recover_s": 0.25,
        "expected_failures": "UNAVAILABLE (by design)",
        "figures": {"retries": 2, "slowest_ms": 12.5, "note": "text"},
        "test": "tests/reliability/test_reliability_report.py::test_synthetic",
        "recorded_at": "2026-01-01T00:00:00Z",
        "cpu_cores": 2,
        **changes,
    }


def soak_result(duration_s: float, started_at: str) -> dict[str, Any]:
    growth = {"rss_growth_pct": 0.5, "fd_growth": 0.0, "thread_growth": 1.0}
    return {
        "config": {"duration_s": duration_s},
        "machine": {"cores": 2},
        "started_at": started_at,
        "elapsed_s": duration_s + 0.2,
        "load": "4 clients",
        "faults": "deadlines and cancellations",
        "requests": {
            "ok": 1000,
            "failed_by_design": {"DEADLINE_EXCEEDED": 7, "CANCELLED": 9},
            "unexpected_failures": {},
            "wrong_answers": 0,
        },
        "services": {"gateway": {"growth": growth}, "router": {"growth": growth}},
        "passed": True,
    }


def write(path: Path, document: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document))
    return path


def table_rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("| **")]


def run_script(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )


def test_every_record_and_the_long_soak_become_one_row_each_in_a_fixed_order(tmp_path: Path) -> None:
    results, soak, output = tmp_path / "reliability", tmp_path / "soak", tmp_path / "reliability.md"
    # the records in the repository now (other scenarios are added over time), plus two of our own
    shutil.copytree(RECORDS, results) if RECORDS.is_dir() else results.mkdir()
    write(results / "zz-synthetic.json", record("zz-synthetic"))
    write(results / "aa-synthetic.json", record("aa-synthetic", recover_s=None, figures={}))
    scenarios = sorted(path.stem for path in results.glob("*.json"))
    write(soak / "20260101-000000.json", soak_result(600, "2026-01-01T00:00:00Z"))
    write(soak / "20260102-000000.json", soak_result(120, "2026-01-02T00:00:00Z"))  # too short: left out
    write(soak / "latest.json", soak_result(120, "2026-01-02T00:00:00Z"))

    completed = run_script("--results", results, "--soak", soak, "--output", output)
    assert completed.returncode == 0, completed.stderr
    text = output.read_text()

    rows = table_rows(text)
    assert len(rows) == len(scenarios) + 1
    for scenario in scenarios:
        assert sum(f"** ({scenario}) |" in row for row in rows) == 1, scenario
    assert "(soak-10min)" in rows[-1] and "1,000" in rows[-1] and "7 DEADLINE_EXCEEDED and 9 CANCELLED" in rows[-1]
    assert all(row.count(" | ") == len(report.COLUMNS) - 1 for row in rows)  # pipes in text are escaped
    synthetic = next(row for row in rows if "(zz-synthetic)" in row)
    assert "0.25 s" in synthetic and "slowest 12.5 ms" in synthetic and "2 CPU cores" in synthetic

    # the same records render the same document (rows sorted, never in directory-listing order)
    assert run_script("--results", results, "--soak", soak, "--output", tmp_path / "again.md").returncode == 0
    assert (tmp_path / "again.md").read_text() == text


@pytest.mark.parametrize(
    ("name", "content", "complaint"),
    [
        ("missing.json", {k: v for k, v in record("missing").items() if k != "wrong_answers"}, "missing field"),
        ("typed.json", record("typed", succeeded="ten"), "'succeeded'"),
        ("boolean.json", record("boolean", failed=True), "'failed'"),
        ("renamed.json", record("another-name"), "does not match the file name"),
        ("figures.json", record("figures", figures={"nested": {"a": 1}}), "figure 'nested'"),
        ("node.json", record("node", test="tests/test_x.py"), "pytest node id"),
        ("array.json", [record("array")], "JSON object"),
        ("broken.json", None, "not JSON"),
    ],
)
def test_a_malformed_record_stops_the_script_and_names_the_file(
    tmp_path: Path, name: str, content: object, complaint: str
) -> None:
    results, output = tmp_path / "reliability", tmp_path / "reliability.md"
    write(results / "good.json", record("good"))
    path = results / name
    if content is None:
        path.write_text('{"scenario": "broken", ')
    else:
        write(path, content)

    with pytest.raises(report.MalformedRecord, match=complaint) as raised:
        report.load_records(results)
    assert str(path) in str(raised.value)

    completed = run_script("--results", results, "--soak", tmp_path / "no-soak", "--output", output)
    assert completed.returncode == 1
    assert str(path) in completed.stderr and complaint.strip("'") in completed.stderr
    assert not output.exists()


def test_a_soak_result_in_another_format_is_refused(tmp_path: Path) -> None:
    write(tmp_path / "reliability" / "good.json", record("good"))
    write(tmp_path / "soak" / "20260101-000000.json", {"started_at": "x"})
    completed = run_script(
        "--results", tmp_path / "reliability", "--soak", tmp_path / "soak", "--output", tmp_path / "out.md"
    )
    assert completed.returncode == 1 and "not a soak result" in completed.stderr
