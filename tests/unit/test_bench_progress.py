"""Progress of `moe-serve bench` and `soak` per section: callbacks see every section, the bar is drawn
only on a terminal and not with --quiet."""

from __future__ import annotations

import inspect
import io

import pytest
from rich.console import Console
from typer.main import get_command

from moe_serve.bench import soak
from moe_serve.bench.progress import SectionProgress, section_bar, shows_progress
from moe_serve.bench.runner import SECTION_ORDER, BenchConfig, bench_sections, run_bench
from moe_serve.cli.main import app


def console(terminal: bool) -> tuple[Console, io.StringIO]:
    stream = io.StringIO()
    return Console(file=stream, force_terminal=terminal, width=100), stream


def run_sections(progress: SectionProgress, names: list[str]) -> None:
    for name in names:
        progress.start(name)


def test_a_callback_sees_every_section_in_order() -> None:
    seen: list[tuple[str, int, int]] = []
    names = bench_sections(BenchConfig())
    run_sections(SectionProgress(names, [lambda *event: seen.append(event)]), names)
    assert seen == [(name, position, len(names)) for position, name in enumerate(names, start=1)]


def test_an_unplanned_section_is_counted_not_fatal() -> None:
    seen: list[tuple[str, int, int]] = []
    progress = SectionProgress(["a"], [lambda *event: seen.append(event)])
    run_sections(progress, ["a", "b"])
    assert seen == [("a", 1, 1), ("b", 2, 2)]


@pytest.mark.parametrize(("terminal", "quiet"), [(False, False), (False, True), (True, True)])
def test_no_bar_when_quiet_or_not_a_terminal(terminal: bool, quiet: bool) -> None:
    target, stream = console(terminal)
    assert not shows_progress(target, quiet)
    with section_bar(target, "bench", ["start", "core"], quiet=quiet) as progress:
        run_sections(progress, ["start", "core"])
    assert stream.getvalue() == ""
    assert progress.started == ["start", "core"]  # the run is still told about every section


def test_a_terminal_gets_a_bar_naming_the_sections() -> None:
    target, stream = console(terminal=True)
    with section_bar(target, "bench", ["start", "core"]) as progress:
        run_sections(progress, ["start", "core"])
    drawn = stream.getvalue()
    assert "bench: done" in drawn and "2/2" in drawn


def test_bench_plans_the_sections_asked_for_in_run_order() -> None:
    config = BenchConfig(sections=("offload", "sweep"))
    assert bench_sections(config) == ["start", "core", "sweep", "offload"]
    # every section the command offers by default is planned
    params = get_command(app).commands["bench"].params
    (sections,) = [param for param in params if param.name == "sections"]
    assert set(sections.default.split(",")) <= set(SECTION_ORDER)


@pytest.mark.parametrize(
    ("function", "names"),
    [(run_bench, ["start", "core", *SECTION_ORDER]), (soak.run_soak, list(soak.SOAK_SECTIONS))],
)
def test_every_planned_section_is_announced_by_the_run(function: object, names: list[str]) -> None:
    """The runs start processes, so they are not run here: their module's source (the run and the steps
    it is split into) must announce each planned section."""
    source = inspect.getsource(inspect.getmodule(function))
    for name in names:
        assert f'.start("{name}")' in source, name
