"""Process lifetimes of `moe-serve up`: children that die with it, and nothing left behind when it dies hard.

Two mechanisms, because neither covers everything alone:
- the gateway and router children ask the kernel for a signal when `up` dies (`PR_SET_PDEATHSIG`);
- a watchdog process (`python -m moe_serve.cluster.watchdog`) records every descendant of `up`, Ray's
  GCS, raylet, agents and actor processes included, and stops whatever of them is left once `up` is
  gone, however it went (a clean exit, SIGKILL, a group signal). Ray's own processes reparent when
  the raylet dies, so only a record taken while `up` lived can find them.
Processes are identified by PID *and* start time, so a PID the kernel reused is never signalled.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import psutil

logger = logging.getLogger(__name__)

PARENT_PID_ENV = "MOE_SERVE_PARENT_PID"  # set for a child that must die with the process of this PID
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@dataclass(frozen=True)
class ProcessRecord:
    """One process, told apart from a later process that reuses its PID by its start time."""

    pid: int
    started: float  # psutil create_time(), seconds since the epoch

    @classmethod
    def of(cls, process: psutil.Process) -> ProcessRecord:
        return cls(process.pid, process.create_time())

    def alive(self) -> bool:
        try:
            process = psutil.Process(self.pid)
            return process.create_time() == self.started and process.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def signal(self, signum: int) -> None:
        """Send `signum` if this is still the recorded process (never to a reused PID)."""
        with contextlib.suppress(psutil.Error):
            process = psutil.Process(self.pid)
            if process.create_time() == self.started:
                process.send_signal(signum)


def descendants(pid: int) -> set[ProcessRecord]:
    """Every live descendant of `pid` (children, grandchildren, ...); empty when `pid` is gone."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return set()
    records = set()
    for child in children:
        with contextlib.suppress(psutil.Error):
            records.add(ProcessRecord.of(child))
    return records


def stop_processes(records: set[ProcessRecord], grace_s: float) -> set[ProcessRecord]:
    """SIGTERM every live one at once, SIGKILL what is left after `grace_s`; returns the survivors
    (normally none: a process in uninterruptible sleep can outlive even SIGKILL for a while)."""
    alive = {record for record in records if record.alive()}
    for record in alive:
        record.signal(signal.SIGTERM)
    alive = _wait_gone(alive, grace_s)
    for record in alive:
        record.signal(signal.SIGKILL)
    return _wait_gone(alive, 2.0)


def _wait_gone(records: set[ProcessRecord], timeout_s: float) -> set[ProcessRecord]:
    deadline = time.monotonic() + timeout_s
    while (records := {r for r in records if r.alive()}) and time.monotonic() < deadline:
        time.sleep(0.05)
    return records


def die_with_parent() -> None:
    """In a child started with PARENT_PID_ENV: get SIGTERM from the kernel when that parent dies.

    Called first thing in the child (not in a preexec_fn, which is unsafe in a threaded parent
    such as a Ray driver). If the parent died before the call, the signal would never come, so the
    child checks and leaves at once. The variable is removed so grandchildren do not inherit it.
    """
    expected = os.environ.pop(PARENT_PID_ENV, None)
    if expected is None or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        logger.warning("could not ask to die with the parent (errno %d)", ctypes.get_errno())
    if os.getppid() != int(expected):
        sys.exit(f"parent process {expected} is gone; not starting")


def child_environment() -> dict[str, str]:
    """Environment entries that make a `moe-serve` child die with this process (see die_with_parent).

    The kernel sends the signal when the *thread* that forked the child ends, so such children must
    be started from a thread that lives as long as the process: `up` starts them on its main thread."""
    return {PARENT_PID_ENV: str(os.getpid())}


def start_watchdog() -> subprocess.Popen[bytes]:
    """Start the watchdog of this process; it stops every descendant left once this process is gone.

    It holds the read end of a pipe whose write end only this process has: the pipe closes when
    this process ends, however it ends. It shares our process group (a signal to the group that
    kills everything with SIGKILL kills it too) and ignores the polite group signals, since it
    must outlive us to do its work.
    """
    return subprocess.Popen(
        [sys.executable, "-m", "moe_serve.cluster.watchdog", str(os.getpid())],
        stdin=subprocess.PIPE,
        close_fds=True,
    )
