"""Structured logs: one line per event, `key=value` pairs, first the event name.

    ts=2026-01-01T08:00:00.000Z level=info event=agent.serving node=n1 address=127.0.0.1:7001

Values with spaces or quotes are quoted, so a line splits back into its pairs with
`shlex.split`. Daemons log through `event()`; nothing else formats log lines.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

_FIELDS = "volkin_fields"


def _quote(value: object) -> str:
    text = str(value)
    if text and not any(c in text for c in ' "=\\\n\t'):
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


class KeyValueFormatter(logging.Formatter):
    """Formats a record as `ts=… level=… event=… k=v …`."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        pairs: dict[str, object] = {
            "ts": f"{ts}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
        }
        fields = getattr(record, _FIELDS, None)
        if fields is None:  # a plain message (asyncio's, a library's): a field of its own
            pairs["event"] = f"{record.name}.message"
            pairs["message"] = record.getMessage()
        else:
            pairs["event"] = record.getMessage()
            pairs.update(fields)
        if record.exc_info:
            pairs["exception"] = self.formatException(record.exc_info)
        return " ".join(f"{k}={_quote(v)}" for k, v in pairs.items())


def configure(level: str = "info") -> None:
    """Sends every log record of the process to stderr as key=value lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def event(logger: logging.Logger, name: str, level: int = logging.INFO,
          exc_info: bool = False, **fields: Any) -> None:
    """Logs the event `name` with `fields` as key=value pairs."""
    logger.log(level, name, extra={_FIELDS: fields}, exc_info=exc_info)
