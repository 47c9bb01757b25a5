"""structlog, configured once by the entry point: JSON to a pipe, console on a TTY."""

from __future__ import annotations

import logging
import sys

import structlog


def configure(level: str = "info", fmt: str = "auto") -> None:
    as_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # No local variables in a console traceback: rich draws every frame's by default, and a request's
    # frames hold its bearer token and the Settings (JOB_TOKEN_SECRET, REDIS_SIGNING_KEY, CRM_JWT_SECRET).
    tracebacks = structlog.dev.RichTracebackFormatter(show_locals=False) if structlog.dev.rich else structlog.dev.plain_traceback
    renderer = structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer(exception_formatter=tracebacks)
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info if as_json else structlog.dev.set_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
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
