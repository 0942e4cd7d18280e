"""Durations and sizes as people write them (`250ms`, `5s`, `256MiB`), parsed one way for the
config file and the command line. Pure and light: `scan --timeout 100ms` parses a duration
without loading the config's pydantic models.
"""

from __future__ import annotations

import re

_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d)?")
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE = re.compile(r"(\d+)\s*(B|kB|KB|MB|GB|KiB|MiB|GiB|TiB)?")
_BYTES = {"B": 1, "kB": 10**3, "KB": 10**3, "MB": 10**6, "GB": 10**9,
          "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}  # fmt: skip


def parse_duration(value: str | int | float) -> float:
    """Seconds in `250ms`, `5s`, `1m`, `1h`, `7d`, or a plain number of seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    match = _DURATION.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None:
        raise ValueError("expected a duration such as 250ms, 5s, 1m, 1h, 7d or seconds")
    number, unit = match.groups()
    # Divide for ms rather than multiply by 0.001, so 250ms is exactly 250 / 1000.
    return float(number) / 1000 if unit == "ms" else float(number) * _SECONDS[unit or "s"]


def parse_size(value: str | int) -> int:
    """Bytes in `256MiB`, `64KiB`, `1GiB`, `10MB`, or a plain number of bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    match = _SIZE.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None:
        raise ValueError("expected a size such as 256MiB, 64KiB, 1GiB or bytes")
    number, unit = match.groups()
    return int(number) * _BYTES[unit or "B"]
