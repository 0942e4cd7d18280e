"""Scale factors read live (`scale_from:`): SunSpec's sunssf registers. Pure.

A point with `scale_from: W_SF` is worth `raw * 10**W_SF * scale + offset`, where W_SF is the
raw int16 read *in the same poll* (the planner puts the factor's register in every poll group
of a point scaled from it, bridge.core.planner). The factor comes first, so `scale` and
`offset` keep meaning what they mean on any point: a conversion of the device's value (W to kW
with `scale: 0.001`, an offset in the published unit), never something multiplied by 10**sf.

Some inverters (SolarEdge) change their factors at run time; a factor baked in when the map
was made would then publish values 10x or 100x off. A factor read with its values cannot be.

A factor of -32768 (0x8000, SunSpec's "not implemented") or outside -10..10 (no meter scales
by more; a garbled register does) makes no number: the points scaled from it are left out of
that poll, as a value that fails to decode is, and counted. Nothing here raises.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from bridge.core.codec import Value
from bridge.core.normalize import BadValue, Scaled, decimals, engineering

NOT_IMPLEMENTED = -0x8000  # SunSpec sunssf "not implemented"
LIMIT = 10  # |exponent| beyond this is a broken register, not a scale


class Named(Scaled, Protocol):
    """What live scaling needs of a point (config.Point satisfies it)."""

    @property
    def name(self) -> str: ...
    @property
    def scale_from(self) -> str | None: ...


def exponent(raw: Value | None) -> int | None:
    """The power of ten a factor register's raw value stands for, or None if it stands for
    none (not read, not implemented, out of range)."""
    if not isinstance(raw, int) or isinstance(raw, bool) or raw == NOT_IMPLEMENTED:
        return None
    return raw if -LIMIT <= raw <= LIMIT else None


def scaled(point: Scaled, raw: Value, power: int) -> Value:
    """`raw * 10**power`, then the point's scale, offset and precision. An integer register
    keeps the decimals the factor gives it (2305 with -1 is 230.5, not 230.50000000000003),
    and stays an integer when the factor is not negative and scale and offset keep it whole."""
    if isinstance(raw, bool | str) or point.values is not None:
        return engineering(point, raw)  # the config refuses these; kept total all the same
    # int / int is correctly rounded: the nearest float to the exact decimal.
    value = raw * 10**power if power >= 0 else raw / 10**-power
    precision = point.precision
    if point.scale != 1 or point.offset != 0:
        value = value * point.scale + point.offset
        if precision is None and isinstance(raw, int):
            precision = max(max(0, -power) + decimals(point.scale), decimals(point.offset))
    return engineering(_Rounding(precision), value)


@dataclass(frozen=True, slots=True)
class _Rounding:
    """A point whose value is already scaled: engineering only rounds it (and refuses NaN)."""

    precision: int | None
    scale: float = 1.0
    offset: float = 0.0
    values: Mapping[int, str] | None = None


def normalize_all(readings: Iterable[tuple[Named, Value]], into: dict[str, Value]) -> int:
    """Engineering values of a poll's `readings` into `into`, by point name; how many could
    not be published (NaN, infinity). The path of every device without `scale_from`."""
    bad = 0
    for point, raw in readings:
        # Most registers are integers published as read: engineering() would return `raw`
        # (precision rounds floats only); this test costs a fifth of the call.
        if (type(raw) is int and point.values is None and point.scale == 1
                and point.offset == 0):
            into[point.name] = raw
            continue
        try:
            into[point.name] = engineering(point, raw)
        except BadValue:
            bad += 1
    return bad


class LiveScales:
    """The points of one device scaled from a factor read live, and how to normalise a poll
    of them. Build one per device that has any (`LiveScales.of`); others use `normalize_all`
    and pay nothing per value."""

    __slots__ = ("factors", "sources")

    def __init__(self, points: Iterable[Named]) -> None:
        self.sources: dict[str, str] = {
            p.name: p.scale_from for p in points if p.scale_from is not None}
        self.factors = frozenset(self.sources.values())

    @classmethod
    def of(cls, points: Iterable[Named]) -> LiveScales | None:
        live = cls(points)
        return live if live.sources else None

    def normalize_all(self, readings: Iterable[tuple[Named, Value]],
                      into: dict[str, Value]) -> int:
        """As `normalize_all`, each point scaled from a factor by the factor read in this
        poll; one without a usable factor is left out and counted."""
        bad = 0
        waiting: list[tuple[Named, Value, str]] = []
        powers: dict[str, Value] = {}
        for point, raw in readings:
            source = self.sources.get(point.name)
            if source is not None:
                waiting.append((point, raw, source))
                continue
            if point.name in self.factors:
                powers[point.name] = raw
            try:
                into[point.name] = engineering(point, raw)
            except BadValue:
                bad += 1
        for point, raw, source in waiting:
            power = exponent(powers.get(source))
            if power is None:
                bad += 1
                continue
            try:
                into[point.name] = scaled(point, raw, power)
            except BadValue:
                bad += 1
        return bad


def with_factors(points: Mapping[str, Named], names: Iterable[str]) -> list[str]:
    """`names` and, after them, the factors they are scaled from that are not among them: what
    a read of only some points must read (`read -c FILE DEVICE POINT`)."""
    asked = list(dict.fromkeys(names))
    needed = (points[n].scale_from for n in asked)
    return asked + [f for f in dict.fromkeys(needed) if f is not None and f in points
                    and f not in asked]
