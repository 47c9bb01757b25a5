"""structlog, configured once by the entry point: JSON to a pipe, console on a TTY."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import msgspec
import structlog

from .context import current_request_id


def _fallback(value: object) -> str:
    return repr(value)  # what structlog's JSONRenderer writes for a value JSON has no type for


_encode = msgspec.json.Encoder(enc_hook=_fallback).encode
_format_exc_info = structlog.processors.format_exc_info
_LEVELS = {"warn": "warning", "exception": "error"}  # as structlog's add_log_level names them


class _Clock:
    """ISO 8601 UTC with microseconds, as TimeStamper(fmt="iso", utc=True) writes it; the date and
    time part is formatted once a second, not per line."""

    __slots__ = ("_second", "_head")

    def __init__(self) -> None:
        self._second, self._head = -1, ""

    def __call__(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second, self._head = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._head}.{int((now - second) * 1_000_000):06d}Z"


def add_request_id(logger: object, method_name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """The id of the request being served, on every line logged while it is (`context.current_request_id`)."""
    if "request_id" not in event_dict and (rid := current_request_id.get()) is not None:
        event_dict["request_id"] = rid
    return event_dict


def json_line(clock: _Clock | None = None) -> Any:
    """The whole JSON pipeline in one processor: level, timestamp, the request id, the traceback as
    text, rendered by msgspec to bytes (the canonical request line is one of these per request).

    The request id comes from `context.current_request_id`, which the request middleware sets
    anyway: no structlog context is bound per request, and none is merged per line.
    """
    stamp = clock or _Clock()

    def render(logger: object, method_name: str, event_dict: dict[str, Any]) -> bytes:
        add_request_id(logger, method_name, event_dict)
        event_dict["level"] = _LEVELS.get(method_name, method_name)
        event_dict["timestamp"] = stamp()
        if "exc_info" in event_dict:
            event_dict = _format_exc_info(logger, method_name, event_dict)  # type: ignore[arg-type]
        return _encode(event_dict)

    return render


def configure(level: str = "info", fmt: str = "auto") -> None:
    as_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    shared = [
        structlog.contextvars.merge_contextvars,
        add_request_id,  # the console's lines and the standard library's (uvicorn, asyncio) carry it too
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # No local variables in a console traceback: rich draws every frame's by default, and a request's
    # frames hold its bearer token and the Settings (JOB_TOKEN_SECRET, REDIS_SIGNING_KEY, CRM_JWT_SECRET).
    tracebacks = structlog.dev.RichTracebackFormatter(show_locals=False) if structlog.dev.rich else structlog.dev.plain_traceback
    renderer = structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer(exception_formatter=tracebacks)
    if as_json:
        # One processor and bytes straight to stderr's buffer (one write and flush a line): the
        # five-processor chain with the standard library's json was 6 % of a cache hit's CPU.
        processors: list[Any] = [json_line()]
        factory: Any = structlog.BytesLoggerFactory(sys.stderr.buffer)
    else:
        processors = [*shared, structlog.dev.set_exc_info, renderer]
        factory = structlog.PrintLoggerFactory(sys.stderr)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    # uvicorn and friends log through the standard library: same format, same stream.
    handler = logging.StreamHandler(sys.stderr)
    # Their exc_info (uvicorn's and asyncio's errors) becomes text in the JSON line, not a tuple's repr.
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(foreign_pre_chain=shared, processors=[
        structlog.stdlib.ProcessorFormatter.remove_processors_meta,
        *([structlog.processors.format_exc_info] if as_json else []), renderer]))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore"):  # one line per request is ours to write
        logging.getLogger(noisy).setLevel(logging.WARNING)
