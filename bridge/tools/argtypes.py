"""Argument types of the CLI: each parses one kind of value or says, in one line, what it
expected (argparse turns that into a usage error, exit 2)."""

from __future__ import annotations

import argparse
import math
from typing import Literal

from bridge.units import parse_duration


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):  # 0 would wait forever in some layers
        raise argparse.ArgumentTypeError(f"expected a number of seconds above 0, not {text!r}")
    return value


def duration(text: str) -> float:
    try:
        value = parse_duration(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a duration above 0 such as 200ms or 0.5, "
                                         f"not {text!r}")
    return value


def expect(text: str) -> tuple[float, float]:
    """`--expect LOW..HIGH`."""
    from bridge.core.plausibility import parse_expect  # noqa: PLC0415 - the CLI starts fast

    try:
        return parse_expect(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def baud(text: str) -> int | Literal["config"]:
    if text == "config":
        return "config"
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"expected a baud rate or 'config', not {text!r}")
    return int(text)
