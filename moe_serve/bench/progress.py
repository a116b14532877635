"""Progress of `moe-serve bench` and `soak` per section: a rich progress bar on stderr.

A run announces each section as it starts (`SectionProgress.start`); callbacks see every
announcement, and `section_bar` adds a bar that names the current section, counts the sections
done and shows the time elapsed. The bar is drawn only for a person watching: never with --quiet,
never when stderr is not a terminal (CI logs, a pipe), where it would only add noise.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

logger = logging.getLogger(__name__)

# (section name, 1-based position, sections planned)
SectionCallback = Callable[[str, int, int], None]


class SectionProgress:
    """The sections a run plans, announced one by one as they start."""

    def __init__(self, sections: Sequence[str], callbacks: Sequence[SectionCallback] = ()) -> None:
        self.sections = list(sections)
        self.callbacks = list(callbacks)
        self.started: list[str] = []

    def start(self, name: str) -> None:
        if name not in self.sections:
            # the plan missed a section: count it rather than fail a run that may have taken an hour
            logger.warning("section %r was not planned (planned: %s)", name, ", ".join(self.sections))
            self.sections.append(name)
        self.started.append(name)
        for callback in self.callbacks:
            callback(name, len(self.started), len(self.sections))


def shows_progress(console: Console, quiet: bool) -> bool:
    """Whether to draw a bar: not asked to be quiet, and the console writes to a terminal."""
    return not quiet and console.is_terminal


@contextlib.contextmanager
def section_bar(
    console: Console, title: str, sections: Sequence[str], quiet: bool = False
) -> Iterator[SectionProgress]:
    """A SectionProgress for `sections`, drawn as a bar on `console` unless quiet or not a terminal.

    Lines the run prints on the same console meanwhile appear above the bar."""
    if not shows_progress(console, quiet):
        yield SectionProgress(sections)
        return
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(title, total=len(sections))

        def advance(name: str, position: int, total: int) -> None:
            bar.update(task, description=f"{title}: {name}", completed=position - 1, total=total)

        progress = SectionProgress(sections, [advance])
        yield progress
        bar.update(task, description=f"{title}: done", completed=len(progress.sections))
