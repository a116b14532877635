"""`python -m moe_serve.cluster.watchdog PID`: started by `moe-serve up` (moe_serve.cluster.lifecycle.start_watchdog).

Records every descendant of PID once a second while PID lives; when its standard input closes
(PID ended: exited, was killed, whatever the signal), stops whatever recorded process is still
alive: SIGTERM, then SIGKILL after a grace period. Then it exits itself.
"""

from __future__ import annotations

import os
import select
import signal
import sys

from moe_serve.cluster.lifecycle import ProcessRecord, descendants, stop_processes

SCAN_INTERVAL_S = 1.0
# a child of a SIGKILLed `up` drains for up to its own grace period (5 s) after the kernel's SIGTERM;
# Ray's processes need less. Everything is gone well within the 10 s a clean stop promises.
GRACE_S = 5.0


def watch(parent_pid: int) -> set[ProcessRecord]:
    """Record the parent's descendants until standard input reaches end of file; return the record."""
    me = os.getpid()
    recorded: set[ProcessRecord] = set()
    while True:
        readable, _, _ = select.select([sys.stdin.fileno()], [], [], SCAN_INTERVAL_S)
        recorded = {r for r in recorded if r.alive()} | {r for r in descendants(parent_pid) if r.pid != me}
        if readable and not os.read(sys.stdin.fileno(), 4096):
            return recorded


def main(argv: list[str]) -> int:
    # a group SIGTERM/SIGINT (systemd, Ctrl-C) reaches this process too: it must outlive `up` to clean up
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    parent_pid = int(argv[1])
    recorded = watch(parent_pid)
    left = {record for record in recorded if record.alive()}
    if left:
        pids = ", ".join(str(record.pid) for record in sorted(left, key=lambda r: r.pid))
        print(f"moe-serve watchdog: up (pid {parent_pid}) is gone; stopping what it left: {pids}", file=sys.stderr)
        survivors = stop_processes(left, GRACE_S)
        if survivors:
            print(f"moe-serve watchdog: could not stop {sorted(r.pid for r in survivors)}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
