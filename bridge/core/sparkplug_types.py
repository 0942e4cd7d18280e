"""Sparkplug B datatypes: which a point's engineering value has, and how it travels. Pure.

Integers travel in the unsigned fields the datatype names; signed ones as two's complement
of their own width (Int16 -1 is int_value 65535), as Eclipse Tahu's Python library and
pysparkplug write them (see bridge.core.sparkplug). `Wire.encode` turns an engineering value
into what its field takes, or None when it does not fit the datatype.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

from bridge.core import sparkplug_pb2 as pb
from bridge.core.codec import BIT_TABLES, Value

if TYPE_CHECKING:
    from bridge.config import Point

_FLOAT32_MAX = 3.4028234663852886e38
WireValue: TypeAlias = int | float | bool | str
Encode: TypeAlias = Callable[[Value], WireValue | None]


def _whole(value: Value) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not value.is_integer():
        return None
    return int(value)


def _signed(bits: int) -> Encode:
    low, high, mask = -(1 << (bits - 1)), 1 << (bits - 1), (1 << bits) - 1

    def encode(value: Value) -> int | None:
        # an int first: the common case, once per value published
        number = value if type(value) is int else _whole(value)
        return None if number is None or not low <= number < high else number & mask

    return encode


def _unsigned(bits: int) -> Encode:
    limit = 1 << bits

    def encode(value: Value) -> int | None:
        number = value if type(value) is int else _whole(value)
        return None if number is None or not 0 <= number < limit else number

    return encode


def _real(value: Value) -> float | None:
    if type(value) is float:  # the common case first: this runs once per value published
        return value
    return None if isinstance(value, bool | str) else float(value)


def _float32(value: Value) -> float | None:
    number = value if type(value) is float else _real(value)
    if number is None or -_FLOAT32_MAX <= number <= _FLOAT32_MAX or not math.isfinite(number):
        return number
    return None  # protobuf would quietly make it infinity


def _boolean(value: Value) -> bool | None:
    if isinstance(value, bool):
        return value
    return bool(value) if isinstance(value, int) and value in (0, 1) else None


def _text(value: Value) -> str | None:
    # An enum state missing from the point's `values` map is published as its number.
    return value if isinstance(value, str) else None if isinstance(value, bool) else str(value)


@dataclass(frozen=True, slots=True)
class Wire:
    """How one datatype travels: the value field it uses and the conversion into it."""

    field: str
    encode: Encode


WIRE: Mapping[int, Wire] = {
    pb.Int16: Wire("int_value", _signed(16)),
    pb.Int32: Wire("int_value", _signed(32)),
    pb.Int64: Wire("long_value", _signed(64)),
    pb.UInt16: Wire("int_value", _unsigned(16)),
    pb.UInt32: Wire("int_value", _unsigned(32)),
    pb.UInt64: Wire("long_value", _unsigned(64)),
    pb.Float: Wire("float_value", _float32),
    pb.Double: Wire("double_value", _real),
    pb.Boolean: Wire("boolean_value", _boolean),
    pb.String: Wire("string_value", _text),
}

_BY_TYPE: Mapping[str, int] = {
    "bool": pb.Boolean, "int16": pb.Int16, "uint16": pb.UInt16, "int32": pb.Int32,
    "uint32": pb.UInt32, "int64": pb.Int64, "uint64": pb.UInt64, "float32": pb.Float,
    "float64": pb.Double, "string": pb.String,
}  # fmt: skip
_INTEGER_TYPES = frozenset({"int16", "uint16", "int32", "uint32", "int64", "uint64"})


def datatype(point: Point) -> int:
    """The Sparkplug datatype of `point`'s engineering value (a `DataType` number).

    The register type's own, except: an enum (`values`) is a String carrying the state's name,
    a bit or coil is a Boolean, and an integer with a scale or offset is a Double. A float32
    stays Float whatever its scale: its precision is the register's. A point scaled from a
    factor read live (`scale_from`) is a Double: the factor, and so the value's kind, may
    change at any poll, and a metric's datatype is fixed by its birth.
    """
    if point.values is not None:
        return pb.String
    if point.table in BIT_TABLES:
        return pb.Boolean
    if point.scale_from is not None:
        return pb.Double
    if point.type in _INTEGER_TYPES and (point.scale != 1 or point.offset != 0):
        return pb.Double
    return _BY_TYPE[point.type]
