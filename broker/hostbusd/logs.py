"""Logging with structlog: console lines on a terminal, JSON lines otherwise; rate-limited peer errors.

The daemon is quiet: a line at start and at stop, and a line when a peer misbehaves or a limit
trips. Those last lines are rate limited per kind (``log.peer_error_interval``): within the
interval further events of the kind are only counted, and the count rides on the next line.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


#: syslog priorities for the journal's ``<N>`` line prefix.
_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}


def _journal_renderer(logger: Any, name: str, event: dict[str, Any]) -> str:
    """A JSON line with the syslog priority as a ``<N>`` prefix, which journald turns into PRIORITY."""
    priority = _PRIORITY.get(str(event.get("level", "info")), 6)
    return f"<{priority}>" + structlog.processors.JSONRenderer()(logger, name, event)  # type: ignore[operator]


def configure(fmt: str, level: str, stream: TextIO | None = None, journal: bool = False) -> None:
    """Set up structlog. ``fmt`` auto: journal lines if ``journal`` (stderr goes to the journal),
    console on a terminal, JSON lines otherwise."""
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "journal" if journal else "console" if stream.isatty() else "json"
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    elif fmt == "journal":
        renderer = _journal_renderer
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,  # a reload may change the level and format
    )


def get_logger(**context: Any) -> Any:
    return structlog.get_logger("hostbusd").bind(**context)


class RateLimitedLog:
    """At most one warning per ``kind`` per ``interval`` seconds; the rest are counted."""

    def __init__(self, interval: float, clock: Any = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._log = get_logger()

    def warning(self, kind: str, **fields: Any) -> bool:
        """Log (True) or count (False) one event of ``kind``."""
        self._log = get_logger()  # the current configuration (a reload may have changed it)
        now = self._clock()
        last = self._last.get(kind)
        if last is not None and now - last < self.interval:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return False
        self._last[kind] = now
        suppressed = self._suppressed.pop(kind, 0)
        if suppressed:
            fields["suppressed_since_last"] = suppressed
        self._log.warning(kind, **fields)
        return True
