"""Logging an unreachable dependency (Redis, the OTLP collector, a registry) once, not per attempt."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


class OutageLog:
    """Logs an outage when it starts and once more when it ends; calls in between stay silent."""

    def __init__(self, what: str) -> None:
        self.what, self.down = what, False

    def failed(self, error: Exception) -> None:
        if not self.down:
            logger.warning("%s: unreachable (%s); keeping the last known state and retrying", self.what, error)
            self.down = True

    def recovered(self) -> None:
        if self.down:
            logger.info("%s: reachable again", self.what)
            self.down = False

    def outcome(self, succeeded: bool, what_failed: str) -> None:
        """Record the result of one attempt."""
        if succeeded:
            self.recovered()
        else:
            self.failed(RuntimeError(what_failed))
