"""Service child processes: `python -m moe_serve <service> ...`, and the ready line each announces.

A service prints `MOE_SERVE_READY {json}` once it serves (moe_serve.runtime.grpc_utils.announce_ready);
its other output is relayed to this process's stderr, prefixed with its name.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from moe_serve.runtime.grpc_utils import READY_MARKER


@dataclass
class ServiceProcess:
    """A `moe-serve <service>` child process and what it announced when ready."""

    name: str
    process: subprocess.Popen[str]
    ready: dict[str, Any]
    recent_output: deque[str] = field(default_factory=lambda: deque(maxlen=50))
    announced: threading.Event = field(default_factory=threading.Event)  # set on the ready line or exit
    # how it was started: a supervisor starts it again the same way (moe_serve.cluster.supervisor)
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    module: str = "moe_serve"

    @property
    def address(self) -> str:
        return str(self.ready["address"])

    def wait_ready(self, timeout_s: float = 120.0) -> ServiceProcess:
        """Block until the process printed its ready line; stop it and raise if it did not in time."""
        if not self.announced.wait(timeout_s) or not self.ready:
            self.stop(grace_s=2)
            tail = "\n".join(self.recent_output)
            raise RuntimeError(
                f"{self.name} did not become ready within {timeout_s:.0f} s "
                f"(exit code {self.process.poll()}); its last output:\n{tail}"
            )
        return self

    def stop(self, grace_s: float = 10.0) -> int:
        """SIGTERM, then SIGKILL after `grace_s`; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_service_process(
    name: str,
    args: list[str],
    timeout_s: float = 120.0,
    env: dict[str, str] | None = None,
    module: str = "moe_serve",
) -> ServiceProcess:
    """Run `python -m <module> <args>` and wait for its ready line (its stdout is then relayed)."""
    return spawn_service_process(name, args, env, module).wait_ready(timeout_s)


def spawn_service_process(
    name: str, args: list[str], env: dict[str, str] | None = None, module: str = "moe_serve"
) -> ServiceProcess:
    """Run `python -m <module> <args>` without waiting: `wait_ready()` on the result waits for its ready line."""
    process = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        env={**os.environ, **(env or {})},
    )
    service = ServiceProcess(name=name, process=process, ready={}, args=list(args), env=dict(env or {}), module=module)

    def relay() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            service.recent_output.append(line.rstrip())
            if line.startswith(READY_MARKER) and not service.announced.is_set():
                service.ready = json.loads(line[len(READY_MARKER) :])
                service.announced.set()
            else:
                # a JSON log line (--log-format json) passes as it is, so that it still parses
                sys.stderr.write(line if line.startswith("{") else f"[{name}] {line}")
        service.announced.set()  # the process ended: wake the waiter

    threading.Thread(target=relay, name=f"relay-{name}", daemon=True).start()
    return service
