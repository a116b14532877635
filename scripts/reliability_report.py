"""Render docs/reliability.md from the reliability records and the latest long soak.

Reads every benchmarks/results/reliability/*.json (written by the `reliability_record` fixture of
tests/conftest.py, one per scenario) and the newest soak result of at least `--min-soak-s` seconds
in benchmarks/results/soak/ (written by `moe-serve soak`), and writes one table row per scenario.
Rows are ordered by test file, then scenario name, with the soak benchmark last, so the same
records always render the same document. A record that is not in the fixture's format stops the
script with the file's name and what is wrong, and nothing is written.

    python scripts/reliability_report.py [--results DIR] [--soak DIR] [--output FILE] [--min-soak-s S]
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RECORD_FIELDS: dict[str, tuple[type, ...]] = {
    "scenario": (str,),
    "title": (str,),
    "load": (str,),
    "faults": (str,),
    "succeeded": (int,),
    "failed": (int,),
    "wrong_answers": (int,),
    "recover_s": (int, float, type(None)),
    "expected_failures": (str,),
    "figures": (dict,),
    "test": (str,),
    "recorded_at": (str,),
    "cpu_cores": (int,),
}
SOAK_FIELDS = ("started_at", "elapsed_s", "load", "faults", "requests", "services", "machine", "config", "passed")
COLUMNS = (
    "scenario",
    "load held",
    "faults injected",
    "succeeded",
    "failed (expected: why)",
    "wrong answers",
    "time to recover",
    "details",
    "machine",
    "produced by",
)
SOAK_COMMAND = "moe-serve soak --duration 600"


class MalformedRecord(ValueError):
    """A result file that cannot be rendered; the message names the file."""


def validate_record(path: Path, record: Any) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise MalformedRecord(f"{path}: expected a JSON object, got {type(record).__name__}")
    for name, types in RECORD_FIELDS.items():
        if name not in record:
            raise MalformedRecord(f"{path}: missing field {name!r}")
        value = record[name]
        # bool is an int to Python, never a count here
        if isinstance(value, bool) or not isinstance(value, types):
            expected = "/".join(t.__name__ for t in types)
            raise MalformedRecord(f"{path}: field {name!r} is {value!r}, expected {expected}")
    if record["scenario"] != path.stem:
        raise MalformedRecord(f"{path}: scenario {record['scenario']!r} does not match the file name")
    for name in ("succeeded", "failed", "wrong_answers"):
        if record[name] < 0:
            raise MalformedRecord(f"{path}: {name} is negative")
    for key, value in record["figures"].items():
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise MalformedRecord(f"{path}: figure {key!r} is {value!r}, expected a number or text")
    if "::" not in record["test"]:
        raise MalformedRecord(f"{path}: test {record['test']!r} is not a pytest node id")
    return record


def load_records(directory: Path) -> list[dict[str, Any]]:
    records = []
    for path in sorted(directory.glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise MalformedRecord(f"{path}: not JSON ({error})") from None
        records.append(validate_record(path, record))
    return sorted(records, key=lambda r: (r["test"].split("::")[0], r["scenario"]))


def latest_soak(directory: Path, min_duration_s: float) -> tuple[Path, dict[str, Any]] | None:
    """The newest soak result that ran for at least `min_duration_s` (latest.json duplicates one)."""
    found = []
    for path in directory.glob("*.json"):
        if path.name == "latest.json":
            continue
        try:
            soak = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise MalformedRecord(f"{path}: not JSON ({error})") from None
        missing = [name for name in SOAK_FIELDS if not isinstance(soak, dict) or name not in soak]
        if missing:
            raise MalformedRecord(f"{path}: not a soak result (missing {', '.join(missing)})")
        if float(soak["config"]["duration_s"]) >= min_duration_s:
            found.append((soak["started_at"], path.name, path, soak))
    if not found:
        return None
    _, _, path, soak = max(found)
    return path, soak


def soak_row(path: Path, soak: dict[str, Any]) -> dict[str, Any]:
    """A soak result in the record format (scenario soak-<minutes>min)."""
    requests = soak["requests"]
    by_design = requests["failed_by_design"]
    growths = [s["growth"] for s in soak["services"].values() if s.get("growth")]
    minutes = float(soak["config"]["duration_s"]) / 60
    return {
        "scenario": f"soak-{minutes:.0f}min",
        "title": f"Soak: {minutes:.0f} min of mixed load",
        "load": soak["load"],
        "faults": soak["faults"],
        "succeeded": requests["ok"],
        "failed": sum(by_design.values()) + sum(requests["unexpected_failures"].values()),
        "wrong_answers": requests["wrong_answers"],
        "recover_s": None,
        "expected_failures": " and ".join(f"{count} {code}" for code, count in by_design.items())
        + " (by design)"
        + (f"; UNEXPECTED: {requests['unexpected_failures']}" if requests["unexpected_failures"] else ""),
        "figures": {
            "max_rss_growth_pct": max(g["rss_growth_pct"] for g in growths),
            "max_fd_growth": max(g["fd_growth"] for g in growths),
            "max_thread_growth": max(g["thread_growth"] for g in growths),
            "services_sampled": len(soak["services"]),
            "passed": "yes" if soak["passed"] else "NO",
        },
        "test": f"`moe-serve soak --duration {soak['config']['duration_s']:g}` "
        f"({path.relative_to(ROOT) if path.is_relative_to(ROOT) else path})",
        "recorded_at": soak["started_at"],
        "cpu_cores": soak["machine"]["cores"],
    }


def cell(text: object) -> str:
    """Markdown table cell: one line, pipes escaped."""
    return str(text).replace("\n", " ").replace("|", "\\|").strip()


def number(value: float | int | str) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:g}"
    return f"{value:,}" if isinstance(value, int) else value


UNITS = {"_per_s": "/s", "_pct": "%", "_ms": " ms", "_s": " s", "_mib": " MiB"}


def figure(key: str, value: float | int | str) -> str:
    """`max_rss_growth_pct`, 0.4 -> `max rss growth 0.4%`; `requests_per_s`, 9 -> `requests 9/s`."""
    for suffix, unit in UNITS.items():
        if key.endswith(suffix):
            return f"{key.removesuffix(suffix).replace('_', ' ')} {number(value)}{unit}"
    return f"{key.replace('_', ' ')} {number(value)}"


def row(record: dict[str, Any]) -> str:
    failed = number(record["failed"])
    if record["expected_failures"]:
        failed += f": {record['expected_failures']}"
    recover = "n/a" if record["recover_s"] is None else f"{record['recover_s']:g} s"
    details = "; ".join(figure(key, value) for key, value in record["figures"].items())
    wrong = str(record["wrong_answers"]) if record["wrong_answers"] == 0 else f"**{record['wrong_answers']}**"
    test = record["test"] if record["test"].startswith("`") else f"`{record['test']}`"
    cells = (
        f"**{record['title']}** ({record['scenario']})",
        record["load"],
        record["faults"],
        number(record["succeeded"]),
        failed,
        wrong,
        recover,
        details or "-",
        f"{record['cpu_cores']} CPU cores",
        test,
    )
    return "| " + " | ".join(cell(c) for c in cells) + " |"


def module_summary(test_file: str) -> str:
    """The first paragraph of a test module's docstring: what its scenarios prove."""
    path = ROOT / test_file
    if not path.is_file():
        return ""
    docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
    return " ".join(docstring.split("\n\n", 1)[0].split())


INTRO = (
    "# Reliability",
    "",
    "Every failure mode of issue 7 is a test with real servers (gateway, router and worker processes, gRPC,",
    "Redis and Ray never mocked) that injects a fault under load and records what happened. Each row below",
    "is one scenario: the load held while the fault was injected, the requests that succeeded and failed",
    "(with why the failures are by design), answers that differed from transformers' reference block",
)
REGENERATE = (
    "Regenerate: run the tests named in the last column with the records sent to the committed folder",
    "(`MOE_SERVE_RELIABILITY_RESULTS=benchmarks/results/reliability`",
    "`MOE_SERVE_SOAK_TEST_S=60 .venv/bin/python -m pytest tests/reliability/test_reliability_*.py` and the",
    "others named there, the soak test for the minute its committed record covers; each writes",
    "`<scenario>.json` there, where a plain test run writes to a temporary directory) and the soak",
    f"benchmark (`.venv/bin/{SOAK_COMMAND}`, written to `benchmarks/results/soak/`), then run",
    "`.venv/bin/python scripts/reliability_report.py`.",
)


def proofs(records: list[dict[str, Any]]) -> list[str]:
    """One line per test module of reliability scenarios (its docstring's first paragraph says what
    they prove); one per scenario recorded by another module (its title and test name say it)."""
    lines: list[str] = []
    modules: dict[str, list[str]] = {}
    for record in records:
        test_file, _, function = record["test"].partition("::")
        if Path(test_file).name.startswith("test_reliability_"):
            modules.setdefault(test_file, []).append(record["scenario"])
        else:
            claim = function.split("[")[0].removeprefix("test_").replace("_", " ")
            lines.append(f"- `{test_file}` ({record['scenario']}): {record['title']}: {claim}.")
    lines += [
        f"- `{test_file}` ({', '.join(scenarios)}): {module_summary(test_file) or 'no module docstring'}"
        for test_file, scenarios in modules.items()
    ]
    return sorted(lines)


def render(records: list[dict[str, Any]], soak: tuple[Path, dict[str, Any]] | None, min_soak_s: float) -> str:
    rows = list(records)
    if soak is not None:
        try:
            rows.append(soak_row(*soak))
        except (KeyError, TypeError, ValueError) as error:
            raise MalformedRecord(f"{soak[0]}: not a soak result in the expected format ({error!r})") from None
    soak_note = (
        f"- `{SOAK_COMMAND}` (the soak benchmark): the suite's soak for ten minutes: RSS growth of every "
        "service at most 5% after the warm-up, no fd or thread growth, no wrong answer."
        if soak
        else f"- No soak result of {min_soak_s:g} s or more in benchmarks/results/soak/ yet: run `{SOAK_COMMAND}`."
    )
    total_wrong = sum(r["wrong_answers"] for r in rows)
    lines = [
        *INTRO,
        f"(must be 0; {total_wrong} in this table), and how long serving took to be correct again.",
        "",
        "What each scenario proves:",
        "",
        *proofs(records),
        soak_note,
        "",
        *REGENERATE,
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
        *(row(record) for record in rows),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks/results/reliability")
    parser.add_argument("--soak", type=Path, default=ROOT / "benchmarks/results/soak")
    parser.add_argument("--output", type=Path, default=ROOT / "docs/reliability.md")
    parser.add_argument("--min-soak-s", type=float, default=600.0, help="Shortest soak run shown (default 600).")
    args = parser.parse_args(argv)
    try:
        records = load_records(args.results)
        soak = latest_soak(args.soak, args.min_soak_s) if args.soak.is_dir() else None
        text = render(records, soak, args.min_soak_s)
    except MalformedRecord as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"wrote {args.output}: {len(records) + (1 if soak else 0)} scenarios")
    return 0


if __name__ == "__main__":
    sys.exit(main())
