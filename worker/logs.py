"""structlog set-up: JSON lines when not a TTY (journald, files), coloured console otherwise.

JSON lines are serialised with orjson and written as bytes, as structlog's performance notes
advise: a busy node writes one canonical line per run, and the standard library's encoder made
that line a tenth of the agent's CPU per run."""

from __future__ import annotations

import json
import logging
import sys
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


def configure(level: str = "info", *, json_output: bool | None = None,
              node: str | None = None) -> None:
    """``node``: named on every line (lines from the scheduler, the elector, ... too, so one
    query per node finds all of its lines in a central log store)."""
    as_json = (not sys.stderr.isatty()) if json_output is None else json_output
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        *([_with_node(node)] if node else []),
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
