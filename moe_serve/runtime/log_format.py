"""Log lines as text for people or as JSON for log shippers (`--log-format json`).

The JSON form is one object per line with the fields shippers index on (time in RFC 3339 UTC,
level, logger, message, process) plus the exception text when there is one; the standard library
formats it, so no logging dependency is added for ~30 lines.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys

from moe_serve.config import LogFormat

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonLogFormatter(logging.Formatter):
    """One JSON object per record: {"time", "level", "logger", "message", "process"[, "exception"]}."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str, log_format: LogFormat = "text") -> None:
    """Root logging to stderr at `level`, in `log_format`. JSON replaces any handler set up before
    (e.g. by Ray in an actor), so that every line a shipper reads parses."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=log_format == "json")
