"""The unit tier starts no process: a test here that spawns one (a service, Ray, a script) fails at
once, naming what it tried to run, instead of quietly slowing the tier down."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest


class ProcessStarted(AssertionError):
    pass


@pytest.fixture(autouse=True)
def no_processes(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def refuse(self: subprocess.Popen, args: object, *rest: object, **options: object) -> None:
        raise ProcessStarted(f"a unit test started a process ({args!r}); it belongs in tests/integration/")

    # every way Python starts a program goes through Popen (subprocess.run, asyncio's subprocesses
    # and Ray's node start-up included); multiprocessing's fork start method is refused below
    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
    monkeypatch.setattr("os.fork", lambda: (_ for _ in ()).throw(ProcessStarted("a unit test forked")))
    yield
