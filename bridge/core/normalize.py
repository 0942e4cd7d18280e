"""Normalisation: raw decoded values -> engineering values, and what is worth publishing. Pure.

`engineering` applies `values` maps, scale/offset and precision. `ChangeFilter` implements
`report: on-change` with a deadband and a heartbeat, the three settings users of every peer
ask for (DESIGN.md complaint 8).
"""

from __future__ import annotations

import decimal
import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from bridge.core.codec import Value
from bridge.errors import CodecError


class Scaled(Protocol):
    """What normalisation needs of a point (config.Point satisfies it)."""

    @property
    def scale(self) -> float: ...
    @property
    def offset(self) -> float: ...
    @property
    def precision(self) -> int | None: ...
    @property
    def values(self) -> Mapping[int, str] | None: ...


class BadValue(CodecError):
    """A decoded value cannot be published (NaN or infinity: JSON has no such numbers)."""


def engineering(point: Scaled, raw: Value) -> Value:
    """The value a user sees: enum name, or raw * scale + offset rounded to precision.

    Integers stay integers when scale and offset leave them whole, so a counter does not turn
    into 1234.0 on the wire.
    """
    if isinstance(raw, bool | str):
        return raw
    if point.values is not None and isinstance(raw, int):
        return point.values.get(raw, raw)  # an unlisted state is still worth seeing as a number
    value: float | int = raw
    precision = point.precision
    if point.scale != 1 or point.offset != 0:
        value = raw * point.scale + point.offset
        if precision is None and isinstance(raw, int):
            # 215 * 0.1 is 21.500000000000004 in binary floating point; an integer register
            # scaled by 0.1 carries one decimal, so that is what we publish.
            precision = max(decimals(point.scale), decimals(point.offset))
    if isinstance(value, float):
        if not math.isfinite(value):
            raise BadValue(f"{value} is not a finite number")
        if precision is not None:
            value = round(value, precision)
            if precision == 0:
                value = int(value)
    return value


@functools.lru_cache(maxsize=256)
def decimals(number: float) -> int:
    """Decimal places `number` is written with: 0.1 -> 1, 0.025 -> 3, 10 -> 0."""
    exponent = decimal.Decimal(repr(number)).normalize().as_tuple().exponent
    return max(0, -exponent) if isinstance(exponent, int) else 0


@dataclass(slots=True)
class _Last:
    value: Value
    at: float


class ChangeFilter:
    """Decides, per point, whether a new reading is published under `report: on-change`.

    A reading passes when it is the first, differs from the last published by at least
    `deadband` (numbers) or at all (others), or when `heartbeat` seconds passed since the last
    published one. The comparison is against the last *published* value, so a slow drift still
    crosses the deadband eventually instead of creeping past it in small steps.
    """

    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last: dict[str, _Last] = {}

    def passes(
        self, key: str, value: Value, now: float, deadband: float | None, heartbeat: float | None
    ) -> bool:
        last = self._last.get(key)
        if last is None or _changed(last.value, value, deadband) or (
            heartbeat is not None and now - last.at >= heartbeat
        ):
            self._last[key] = _Last(value, now)
            return True
        return False

    def forget(self, key: str) -> None:
        """Publish `key` next time whatever it reads (after the device was offline)."""
        self._last.pop(key, None)


def _changed(old: Value, new: Value, deadband: float | None) -> bool:
    if (
        deadband
        and isinstance(old, int | float)
        and isinstance(new, int | float)
        and not isinstance(old, bool)
        and not isinstance(new, bool)
    ):
        return abs(new - old) >= deadband
    return old != new or type(old) is not type(new)
