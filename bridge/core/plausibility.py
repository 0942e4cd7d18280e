"""Which type and byte order a handful of registers most plausibly hold. Pure: no I/O.

`probe` reads the registers twice and hands both readings here. Every type that fits the
register count is decoded in every distinct byte order (bridge.core.codec: 16-bit values
have only AB and BA), and each reading is scored on what a wrong guess tends to give away:

- not finite (NaN, infinity): a float read with the wrong order or type, almost always;
- denormal (a float below 1.2e-38): the top byte of a small integer read as a float exponent;
- outside `--expect LOW..HIGH`, when given: the strongest evidence there is;
- unstable: the two readings differ by more than 1 %; a slowly changing value read in the wrong
  word order jumps, because its low word becomes the high one;
- an extreme magnitude (beyond 1e9, or a float below 1e-6 but not 0): rare in measurements;
- a short decimal (230.5, not 230.51234567): what devices report, scaled or not.

Scores add; the best comes first; among equal scores the smaller reading (a small negative int16
rather than 65494 as uint16), then the order of TYPES_BY_SIZE and BYTE_ORDERS (ABCD first).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from bridge.core.codec import BYTE_ORDERS, ByteOrder, Field, PointType, decode, shortest_float32
from bridge.errors import CodecError

# What `count` registers can be, most often first.
TYPES_BY_SIZE: dict[int, tuple[PointType, ...]] = {
    1: ("uint16", "int16"),
    2: ("float32", "uint32", "int32"),
    4: ("float64", "uint64", "int64"),
}
# 16-bit values: CDAB reads as ABCD, DCBA as BADC.
ORDERS_16: tuple[ByteOrder, ...] = ("ABCD", "BADC")
FLOAT_MIN_NORMAL = {"float32": 1.1754943508222875e-38, "float64": 2.2250738585072014e-308}
UNSTABLE = 0.01  # relative change between two readings beyond which a value "jumps"
HUGE = 1e9
TINY = 1e-6
SHORT_DIGITS = 5  # significant digits of a "short decimal"
MODERATE_INT = 10**6  # integers below this look like counts and readings

# Weights: an --expect match outweighs everything but a non-finite value.
W_NOT_FINITE = -100
W_DENORMAL = -50
W_EXPECTED = 40
W_NOT_EXPECTED = -30
W_UNSTABLE = -20
W_EXTREME = -10
W_SHORT = 5
W_STRING = -5  # a string is plausible only when nothing numeric is


@dataclass(frozen=True, slots=True)
class Candidate:
    """One reading of the registers as `type` in `byte_order`, with why it scored as it did."""

    type: PointType
    byte_order: ByteOrder
    value: int | float | str
    second: int | float | str  # the second reading
    score: int
    reasons: tuple[str, ...] = field(default=())

    def as_json(self) -> dict[str, object]:
        def safe(v: int | float | str) -> int | float | str | None:
            return None if isinstance(v, float) and not math.isfinite(v) else v

        return {"type": self.type, "byte_order": self.byte_order, "value": safe(self.value),
                "second_read": safe(self.second), "score": self.score,
                "reasons": list(self.reasons)}


def candidates(
    first: Sequence[int], second: Sequence[int], expect: tuple[float, float] | None = None
) -> list[Candidate]:
    """Every (type, byte order) `first` could be, scored and ranked, best first."""
    count = len(first)
    ranked: list[Candidate] = []
    for kind in TYPES_BY_SIZE.get(count, ()):
        for order in ORDERS_16 if count == 1 else BYTE_ORDERS:
            f = Field(0, kind, order)
            a, b = _number(f, first), _number(f, second)
            score, reasons = _score(kind, a, b, expect)
            ranked.append(Candidate(kind, order, a, b, score, tuple(reasons)))
    for order in ORDERS_16:  # any count can be text: nameplates often are
        f = Field(0, "string", order, count=count)
        text, again = decode(f, first), decode(f, second)
        assert isinstance(text, str)
        assert isinstance(again, str)
        if text and all(c.isprintable() for c in text):
            ranked.append(Candidate("string", order, text, again, W_STRING, ("printable text",)))
    # Equal scores: the smaller reading first (-42 as int16 before 65494 as uint16, a real
    # count before the same words swapped); sorted() keeps the listed order after that.
    return sorted(ranked, key=lambda c: (-c.score, _magnitude(c.value)))


def _magnitude(value: int | float | str) -> float:
    if isinstance(value, str):
        return 0.0
    return abs(value) if math.isfinite(value) else math.inf


def _number(f: Field, words: Sequence[int]) -> int | float:
    value = decode(f, words)
    if f.type == "float32" and isinstance(value, float):
        return shortest_float32(value)
    if isinstance(value, bool | str):
        raise CodecError(f"{f.type} decoded to {value!r}")
    return value


def _score(
    kind: PointType, a: int | float, b: int | float, expect: tuple[float, float] | None
) -> tuple[int, list[str]]:
    score, reasons = 0, []
    if isinstance(a, float) and not math.isfinite(a):
        return W_NOT_FINITE, ["not finite"]
    if kind in FLOAT_MIN_NORMAL and a != 0 and abs(a) < FLOAT_MIN_NORMAL[kind]:
        score += W_DENORMAL
        reasons.append("denormal")
    if expect is not None:
        if expect[0] <= a <= expect[1]:
            score += W_EXPECTED
            reasons.append("in expected range")
        else:
            score += W_NOT_EXPECTED
            reasons.append("outside expected range")
    if _jumps(a, b):
        score += W_UNSTABLE
        reasons.append("unstable across reads")
    if abs(a) > HUGE or (a != 0 and abs(a) < TINY and "denormal" not in reasons):
        score += W_EXTREME
        reasons.append("extreme magnitude")
    elif _short(a):
        score += W_SHORT
        reasons.append("short decimal" if isinstance(a, float) else "moderate integer")
    return score, reasons


def _jumps(a: int | float, b: int | float) -> bool:
    if isinstance(b, float) and not math.isfinite(b):
        return True
    if a == b:
        return False
    scale = max(abs(a), abs(b))
    return abs(a - b) > UNSTABLE * scale


def _short(value: int | float) -> bool:
    """Few significant digits: 230.5, 1500, 0.25; integers below a million."""
    if isinstance(value, int):
        return abs(value) < MODERATE_INT
    digits = repr(value).lower().split("e")[0].replace("-", "").replace(".", "").strip("0")
    return len(digits) <= SHORT_DIGITS


def parse_expect(text: str) -> tuple[float, float]:
    """`LOW..HIGH` (either may be negative or a float) -> (low, high); ValueError otherwise."""
    low, sep, high = text.partition("..")
    try:
        bounds = (float(low), float(high))
    except ValueError:
        raise ValueError(f"expected LOW..HIGH such as 200..250, not {text!r}") from None
    if not sep or not all(math.isfinite(x) for x in bounds) or bounds[0] > bounds[1]:
        raise ValueError(f"expected LOW..HIGH such as 200..250 with LOW <= HIGH, not {text!r}")
    return bounds
