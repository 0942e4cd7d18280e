"""Writes: a command payload -> a checked value -> one Modbus request -> the read-back.

Pure: `parse_command` turns a payload into a checked engineering value and `plan_write` turns
that value into the one request that writes it (FC5 for a coil, FC6 for one register, FC16 for
more, in the point's byte order). Every check runs before anything reaches the wire; every
refusal is a `CommandRefused` with a one-line reason. The write itself, with its read-back, is
bridge.transports.writestep, shared by MQTT commands and the `write` CLI.

Payloads (DESIGN.md "MQTT contract"): a JSON value (`42.5`, `true`, `"running"`), an object
`{"value": …}` (no other keys: a reading or a result echoed back to a `/set` topic must not
turn into a write), or bare text where JSON would need quotes: an enum name (`running`),
`on`/`off`/`true`/`false` in any case for bool points (what Home Assistant switches send),
and the text itself for string points. A payload that is valid JSON is always read as JSON,
so a string point given `123` is refused: quote it (`"123"`).

Bool points also take 0 and 1; enum points take a name or a code of their `values` map.
`min`/`max` are in engineering units and checked before scale/offset are inverted.
"""

from __future__ import annotations

import decimal
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from bridge.core.codec import BIT_TABLES, Field, Value, encode
from bridge.core.planner import ReadRequest, plan_device
from bridge.errors import BridgeError, CodecError

if TYPE_CHECKING:
    from bridge.config import Point

_WHOLE_TOLERANCE = 1e-6
_SHOWN_PAYLOAD = 60  # characters of a payload quoted in reasons and the audit log
_ON = frozenset({"true", "on"})
_OFF = frozenset({"false", "off"})


class CommandRefused(BridgeError):
    """A command that was not written: the one-line `reason` says why."""

    def __init__(self, reason: str) -> None:
        self.reason = " ".join(reason.split())  # one line, whatever went into it
        super().__init__(self.reason)


# --- pure: payload -> checked value -> Modbus request -----------------------------------------


def parse_command(point: Point, payload: bytes) -> Value:
    """The checked engineering value `payload` asks `point` to take; CommandRefused if not.

    Enum values come back as their name, bool points as a bool. Nothing here does I/O, so a
    refused command provably reaches no device.
    """
    check_writable(point)  # first, so a read-only point says so whatever the payload
    return check_value(point, _decode(point, payload))


def check_value(point: Point, value: Value) -> Value:
    """`value` checked for `point` (type, enum, min/max, scale, register fit), canonicalised."""
    check_writable(point)
    if _is_bool(point):
        value = _as_bool(value)
    elif point.values is not None:
        value = _as_enum(point.values, value)
    elif point.type == "string":
        if not isinstance(value, str):
            raise CommandRefused(f"expected a string for a string point, got {_show(value)} "
                                 f"(quote it to send it as text)")
    elif isinstance(value, bool) or not isinstance(value, int | float):
        raise CommandRefused(f"expected a number for {point.type}, got {_show(value)}")
    _check_limits(point, value)
    plan_write(point, value)  # scale inversion and register fit, refused here if impossible
    return value


@dataclass(frozen=True, slots=True)
class WriteOp:
    """One Modbus write request: FC5 for a coil, FC6 for one register, FC16 for more."""

    kind: Literal["coil", "registers"]
    address: int
    value: bool | tuple[int, ...]

    @property
    def function_code(self) -> int:
        if isinstance(self.value, bool):
            return 5
        return 6 if len(self.value) == 1 else 16


def plan_write(point: Point, value: Value) -> WriteOp:
    """The request that writes engineering `value` to `point`, in the point's byte order.

    A coil is always one FC5 (a point is one bit, so FC15 never applies); a register value is
    one request, so a 32/64-bit value is never torn across two writes.
    """
    check_writable(point)
    assert point.address is not None  # _check_writable refuses points without one
    if point.table in BIT_TABLES:
        return WriteOp("coil", point.address, _as_bool(value))
    raw = _raw(point, value)
    try:
        words = encode(Field(0, point.type, point.order, None, point.count), raw)
    except CodecError as exc:
        shown = "" if raw == value else f"{_show(value)} is raw {_show(raw)}: "
        raise CommandRefused(f"{shown}{exc}") from None
    return WriteOp("registers", point.address, tuple(words))


def check_writable(point: Point) -> None:
    if not point.writable:
        raise CommandRefused(f"point {point.name!r} is read-only (writable is not set)")
    if point.address is None:
        raise CommandRefused(f"point {point.name!r} has no register address to write")
    # Writable single bits are refused by config validation (read-modify-write is not atomic).


def _decode(point: Point, payload: bytes) -> Value:
    """The value in a payload: JSON, `{"value": …}`, or bare text (see the module docstring)."""
    try:
        text = payload.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CommandRefused("payload is not UTF-8 text") from None
    if not text:
        raise CommandRefused("payload is empty")
    try:
        # parse_constant: NaN and Infinity are no JSON and no register value.
        found: Any = json.loads(text, parse_constant=_no_constant)
    except CommandRefused:
        raise
    except (ValueError, RecursionError):
        return _bare(point, text)
    if isinstance(found, dict):
        if set(found) != {"value"}:
            keys = ", ".join(repr(k) for k in list(found)[:5]) or "none"
            raise CommandRefused(f'expected {{"value": …}}, got an object with keys {keys}')
        found = found["value"]
    if found is None or isinstance(found, list | dict):
        raise CommandRefused(f"{_show_json(found)} is not a value")
    if isinstance(found, float) and not math.isfinite(found):
        raise CommandRefused(f"{found} is not a finite number")
    value: Value = found
    return value


def _no_constant(name: str) -> Any:
    raise CommandRefused(f"{name} is not a finite number")


def _bare(point: Point, text: str) -> Value:
    """Unquoted text: an enum name, on/off for bools, the text for strings; nothing else."""
    if _is_bool(point) and text.lower() in _ON | _OFF:
        return text.lower() in _ON
    if point.values is not None or point.type == "string":
        return text
    raise CommandRefused(f"payload is not JSON or a value: {clip(text)!r}")


def _is_bool(point: Point) -> bool:
    return point.table in BIT_TABLES or point.type == "bool"


def _as_bool(value: Value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in _ON | _OFF:
        return value.lower() in _ON
    raise CommandRefused(f"expected true/false (or on/off, 1/0) for a bool point, "
                         f"got {_show(value)}")


def _as_enum(values: Mapping[int, str], value: Value) -> str:
    """The enum name `value` (a name or a code) stands for."""
    if isinstance(value, str):
        if value in values.values():
            return value
    elif not isinstance(value, bool) and isinstance(value, int | float) and value in values:
        return values[int(value)]
    listed = ", ".join(f"{name} ({code})" for code, name in values.items())
    raise CommandRefused(f"{_show(value)} is not one of {listed}")


def _enum_code(values: Mapping[int, str], name: str) -> int:
    return next(code for code, known in values.items() if known == name)


def _check_limits(point: Point, value: Value) -> None:
    if isinstance(value, bool | str):
        if point.values is None or not isinstance(value, str):
            return
        number: float = _enum_code(point.values, value)  # min/max of an enum bound its codes
    else:
        number = value
    if point.min is not None and number < point.min:
        raise CommandRefused(f"{_show(value)} is below min {_show(point.min)}")
    if point.max is not None and number > point.max:
        raise CommandRefused(f"{_show(value)} is above max {_show(point.max)}")


def _raw(point: Point, value: Value) -> Value:
    """The register value for engineering `value`: raw = (value - offset) / scale."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, str):
        return _enum_code(point.values, value) if point.values is not None else value
    if point.scale == 1 and point.offset == 0:
        return value  # exact: a float detour would round 64-bit integers
    if point.scale == 0:
        raise CommandRefused(f"point {point.name!r} has scale 0: no raw value gives {value}")
    if point.type in ("float32", "float64"):
        return (value - point.offset) / point.scale
    # Decimal on the shortest repr of each number: 21.5 at scale 0.1 is exactly raw 215,
    # where binary floating point says 214.99999999999997.
    with decimal.localcontext(prec=60):
        exact = (_dec(value) - _dec(point.offset)) / _dec(point.scale)
        whole = exact.to_integral_value(rounding=decimal.ROUND_HALF_EVEN)
        if abs(exact - whole) > decimal.Decimal(_WHOLE_TOLERANCE):
            raise CommandRefused(
                f"{_show(value)} does not fall on a {point.type} register step (scale "
                f"{_show(point.scale)}, offset {_show(point.offset)}: raw {exact.normalize()})"
            )
    return int(whole)


def _dec(number: int | float) -> decimal.Decimal:
    return decimal.Decimal(number if isinstance(number, int) else repr(number))


def _show(value: Value | float) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    if isinstance(value, str):
        return repr(clip(value))
    return clip(str(value))


def _show_json(value: Any) -> str:
    if value is None:
        return "null"
    return "a list" if isinstance(value, list) else "an object"


def clip(text: str) -> str:
    return text if len(text) <= _SHOWN_PAYLOAD else text[: _SHOWN_PAYLOAD - 1] + "…"


# --- the read-back request --------------------------------------------------------------------


def readback_request(point: Point) -> ReadRequest:
    """The one read that fetches `point` alone (no coalescing: only this point matters)."""
    groups = plan_device([point], interval=1.0)
    return groups[0].requests[0]


def readback_or_none(point: Point) -> ReadRequest | None:
    """The read-back request of a point that may be written, None for one that may not."""
    try:
        check_writable(point)
    except CommandRefused:
        return None
    return readback_request(point)
