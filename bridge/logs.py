"""Logging setup: structlog, readable on a terminal, JSON lines otherwise (journald, files)."""

from __future__ import annotations

import logging
import sys

import structlog


def configure(*, level: str = "info", json: bool | None = None) -> None:
    """Route structlog to stderr; `json=None` picks JSON unless stderr is a terminal."""
    as_json = not sys.stderr.isatty() if json is None else json
    # Tracebacks are plain text, never with local variables: a frame's locals can hold a
    # resolved secret (rich's and structlog's dict tracebacks show locals by default).
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(
            colors=sys.stderr.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            # JSON lines carry the traceback as text in "exception" (else it is lost).
            *([structlog.processors.format_exc_info] if as_json else []),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    _route_stdlib_logging(renderer, as_json)


class _OurHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The root handler configure() installs (replaced, not added to, on a second call)."""


def _route_stdlib_logging(renderer: structlog.typing.Processor, as_json: bool) -> None:
    """Libraries' warnings and errors (asyncio, paho, pymodbus) as lines like ours.

    Without this they reach stderr through logging's last-resort handler as bare text and
    multi-line tracebacks, which break the one-JSON-object-a-line journal format. Only
    WARNING and up: their debug chatter is not ours to show.
    """
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.stdlib.add_logger_name,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *([structlog.processors.format_exc_info] if as_json else []),
            renderer,
        ],
    )
    handler = _OurHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _OurHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
