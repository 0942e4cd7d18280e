"""The words of a register map: tables, value types, byte orders, and how many registers a
value spans. The config format and the codec both speak them, so they live below both.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, TypeAlias

from bridge.errors import CodecError

PointType: TypeAlias = Literal[
    "bool", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64", "string"
]
ByteOrder: TypeAlias = Literal["ABCD", "CDAB", "BADC", "DCBA"]
Table: TypeAlias = Literal["holding", "input", "coil", "discrete"]
Value: TypeAlias = bool | int | float | str

POINT_TYPES: tuple[PointType, ...] = (
    "bool", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64", "string"
)
BYTE_ORDERS: tuple[ByteOrder, ...] = ("ABCD", "CDAB", "BADC", "DCBA")
BIT_TABLES: frozenset[Table] = frozenset({"coil", "discrete"})

# Registers a value of each numeric type spans; bool on a register table reads one register.
_WORDS: Mapping[PointType, int] = {
    "bool": 1, "int16": 1, "uint16": 1, "int32": 2, "uint32": 2,
    "int64": 4, "uint64": 4, "float32": 2, "float64": 4,
}  # fmt: skip


def register_count(type_: PointType, count: int | None = None) -> int:
    """Registers a value of `type_` spans (`count` for strings: 2 characters a register)."""
    if type_ == "string":
        if count is None or count < 1:
            raise CodecError("string points need a count of registers (1 or more)")
        return count
    return _WORDS[type_]
