"""Logging set-up: plain text for terminals, one JSON object per line for collectors."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "msg"}``, the record's structured ``fields`` (passed as
    ``extra={"fields": {...}}``) and ``exc`` when there is a traceback."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup_logging(level: str, fmt: str) -> None:
    """Log to stderr (journald picks it up under systemd) at ``level``."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class LogBudget:
    """Rate limit for the log lines one peer can cause: ``burst`` lines, then one more per
    ``1/rate`` seconds. Lines over the budget are counted, and the next line allowed says how
    many were suppressed, so a peer cannot flood the journal and nothing is silently lost.
    Loop thread only."""

    __slots__ = ("_burst", "_rate", "_stamp", "_suppressed", "_tokens")

    def __init__(self, rate: float = 1.0, burst: int = 20) -> None:
        self._rate = rate
        self._burst = burst
        self._tokens = float(burst)
        self._stamp = time.monotonic()
        self._suppressed = 0

    def allow(self) -> bool:
        """Whether one more line may be logged now."""
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        self._suppressed += 1
        return False

    def suppressed_note(self) -> str:
        """`` (N similar lines suppressed)`` once after lines were dropped, else ``""``."""
        n, self._suppressed = self._suppressed, 0
        return f" ({n} similar lines suppressed)" if n else ""
