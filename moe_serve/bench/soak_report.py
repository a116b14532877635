"""Prints a soak result: resource growth per service, request outcomes per kind, the verdict."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from moe_serve.bench.soak import SoakResult


def _verdict(ok: bool) -> str:
    return "[green]ok[/green]" if ok else "[red]over[/red]"


def print_soak_report(result: SoakResult, console: Console) -> None:
    limits = result.limits
    warmup_s = result.config["duration_s"] * result.config["warmup_fraction"]
    services = Table(
        title=f"moe-serve soak: {result.elapsed_s:.0f} s on {result.model_name}, growth after the first "
        f"{warmup_s:.0f} s (medians of the first and last samples) - {result.machine['description']}"
    )
    for column in ("service", "pid", "RSS MiB start -> end (peak)", "RSS growth", "fds", "threads", "verdict"):
        services.add_column(column)
    for name, service in result.services.items():
        growth = service["growth"]
        if growth is None:
            services.add_row(name, str(service["pid"]), "-", "-", "-", "-", "[red]too few samples[/red]")
            continue
        within = (
            growth["rss_growth_pct"] <= limits["rss_growth_pct"]
            and growth["fd_growth"] <= limits["fd_growth"]
            and growth["thread_growth"] <= limits["thread_growth"]
            and not service["lost"]
        )
        services.add_row(
            name,
            str(service["pid"]),
            f"{growth['rss_mib_start']:.1f} -> {growth['rss_mib_end']:.1f} ({growth['rss_mib_peak']:.1f})",
            f"{growth['rss_growth_pct']:+.2f}% (<= {limits['rss_growth_pct']:g}%)",
            f"{growth['fds_start']:g} -> {growth['fds_end']:g} (+{limits['fd_growth']:g} allowed)",
            f"{growth['threads_start']:g} -> {growth['threads_end']:g} (+{limits['thread_growth']:g} allowed)",
            _verdict(within),
        )
    console.print(services)

    requests = result.requests
    outcomes = Table(title=f"requests: {result.requests_per_s:.1f}/s, {requests['tokens_ok']} tokens answered")
    codes = sorted({code for counts in requests["by_kind"].values() for code in counts})
    for column in ("kind", *codes):
        outcomes.add_column(column, justify="right" if column != "kind" else "left")
    for kind, counts in requests["by_kind"].items():
        outcomes.add_row(kind, *(str(counts.get(code, 0)) for code in codes))
    console.print(outcomes)
    console.print(
        f"ok {requests['ok']}, failed by design {requests['failed_by_design']}, "
        f"unexpected failures {requests['unexpected_failures'] or 0}, wrong answers {requests['wrong_answers']}; "
        f"gateway counters after the load {result.gateway_counters_after}"
    )
    for example in [*requests["wrong_examples"], *requests["unexpected_examples"]]:
        console.print(f"  [yellow]{example}[/yellow]")
    if result.passed:
        console.print("[green]soak passed[/green]")
    else:
        for violation in result.violations:
            console.print(f"[red]FAILED[/red]: {violation}")
