"""structlog set-up: JSON lines when not a TTY (journald, files), coloured console otherwise.

JSON lines are serialised with orjson and written as bytes, as structlog's performance notes
advise: a busy node writes one canonical line per run, and the standard library's encoder made
that line a tenth of the agent's CPU per run."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import orjson
import structlog


def _dumps(event: Any, **kw: Any) -> bytes:
    """orjson, with the standard encoder as the fallback for what orjson refuses (integers
    beyond 64 bits): a log call must never fail."""
    try:
        return orjson.dumps(event, **kw)
    except TypeError:
        return json.dumps(event, default=kw.get("default"), separators=(",", ":")).encode()


# Events a loop logs on every failed attempt during an outage (Consul or Redis unreachable):
# a drill counted 62-65 warnings per node in 9 s of a Consul outage. Repeats within
# REPEAT_EVERY_S are dropped; the next line that passes says how many were.
REPEATING_EVENTS = frozenset({
    "check_pass_failed", "register_failed", "maintenance_poll_failed", "pause_watch_failed",
    "session_cleanup_failed", "stale_session_cleanup_failed", "redis_error",
    "lease_renew_failed", "run_finish_retry", "known_node_record_failed",
})
REPEAT_EVERY_S = 30.0


class RepeatFilter:
    """A structlog processor dropping repeats of the same event (see REPEATING_EVENTS) seen
    less than ``every_s`` ago; the next one that passes carries ``repeats_suppressed``."""

    def __init__(self, events: frozenset[str] = REPEATING_EVENTS,
                 every_s: float = REPEAT_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._events, self._every, self._clock = events, every_s, clock
        self._seen: dict[str, tuple[float, int]] = {}  # event -> (last passed, dropped since)
        self._lock = threading.Lock()

    def __call__(self, _: Any, __: str,
                 event: structlog.typing.EventDict) -> structlog.typing.EventDict:
        name = event.get("event")
        if name not in self._events:
            return event
        now = self._clock()
        with self._lock:
            last, dropped = self._seen.get(name, (float("-inf"), 0))
            if now - last < self._every:
                self._seen[name] = (last, dropped + 1)
                raise structlog.DropEvent
            self._seen[name] = (now, 0)
        if dropped:
            event["repeats_suppressed"] = dropped
        return event


def configure(level: str = "info", *, json_output: bool | None = None,
              node: str | None = None) -> None:
    """``node``: named on every line (lines from the scheduler, the elector, ... too, so one
    query per node finds all of its lines in a central log store)."""
    as_json = (not sys.stderr.isatty()) if json_output is None else json_output
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        *([_with_node(node)] if node else []),
        RepeatFilter(),
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]
    binary = getattr(sys.stderr, "buffer", None)
    logger_factory: Any
    if as_json and binary is not None:
        renderer: structlog.typing.Processor = structlog.processors.JSONRenderer(_dumps)
        logger_factory = structlog.BytesLoggerFactory(binary)
    elif as_json:
        renderer = structlog.processors.JSONRenderer()
        logger_factory = structlog.PrintLoggerFactory(sys.stderr)
    else:
        renderer = structlog.dev.ConsoleRenderer()
        logger_factory = structlog.PrintLoggerFactory(sys.stderr)
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
        ),
        logger_factory=logger_factory,
        cache_logger_on_first_use=True,
    )


def _with_node(node: str) -> structlog.typing.Processor:
    def add_node(_: Any, __: str, event: structlog.typing.EventDict) -> structlog.typing.EventDict:
        event.setdefault("node", node)
        return event

    return add_node
