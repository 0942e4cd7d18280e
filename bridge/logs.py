"""Logging setup: structlog, readable on a terminal, JSON lines otherwise (journald, files)."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any

# structlog imports rich, when it is installed, to offer tracebacks we never use (configure asks
# for plain ones); that import is ~50 ms of every CLI start. rich comes into a dev environment
# with import-linter, never onto a gateway: hide it while structlog loads, so both behave alike.
# A None in sys.modules makes `import rich` fail; later importers of rich still get it.
_HIDE_RICH = "rich" not in sys.modules
if _HIDE_RICH:
    sys.modules["rich"] = None  # type: ignore[assignment]
try:
    import structlog
finally:
    if _HIDE_RICH:
        del sys.modules["rich"]

# Values that came from secret references (${env:…}, ${file:…}, ${credential:…}). A secret
# may end up inside another setting (`host: ${env:BROKER}`) and from there in any message a
# library or we print ("broker unreachable: …", a TLS error naming a file), so every line is
# scrubbed of them on its way out rather than trusting each call site.
_secrets: re.Pattern[str] | None = None
_short: frozenset[str] = frozenset()
REDACTED = "<secret>"
# Shorter values (a QoS "1" from ${env:…}) would garble every number in the logs if replaced
# inside text; they are replaced only where they are a whole value.
_MIN_INSIDE = 4


def redact_secrets(values: Iterable[str]) -> None:
    """From now on, replace each of `values` with <secret> in every log line and in redact()."""
    global _secrets, _short  # noqa: PLW0603 - one process-wide list, set at start and reload
    long = sorted((v for v in values if len(v) >= _MIN_INSIDE), key=len, reverse=True)
    _secrets = re.compile("|".join(map(re.escape, long))) if long else None
    _short = frozenset(v for v in values if 0 < len(v) < _MIN_INSIDE)


def redact(text: str) -> str:
    """`text` with every known secret value replaced by <secret>."""
    if text in _short:
        return REDACTED
    return _secrets.sub(REDACTED, text) if _secrets is not None else text


def _redact_event(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    if _secrets is None and not _short:
        return event
    for key, value in event.items():
        event[key] = _scrub(value)
    return event


def _scrub(value: Any) -> Any:
    """`value` with secrets redacted, keeping its JSON shape (lists stay lists)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, int | float | bool | None):
        return value
    if isinstance(value, list | tuple):
        return [_scrub(item) for item in value]
    if isinstance(value, dict):
        return {key: _scrub(item) for key, item in value.items()}
    return redact(str(value))  # exceptions, paths: as they would be printed


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
            # Tracebacks become text in "exception" (JSON lines would lose them otherwise),
            # so the secret scrub sees them too.
            structlog.processors.format_exc_info,
            _redact_event,
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
            structlog.processors.format_exc_info,
            _redact_event,
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
