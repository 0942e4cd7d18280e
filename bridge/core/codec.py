"""Register codec: Modbus words <-> typed values. Pure: no I/O, no asyncio.

A point's registers are packed once per block into bytes, then each point is read with a
precompiled `struct.Struct` at its offset. Byte orders name the four bytes of a 32-bit value as
they arrive on the wire (ABCD = big-endian words, big-endian bytes, Modicon's default). Packing
the block's words little-endian swaps the bytes inside every word; reading with '<' reverses the
whole value. Those two switches give all four orders for every width:

    order  words packed  struct   what it undoes
    ABCD   big-endian    '>'      nothing
    CDAB   little-endian '<'      word swap
    BADC   little-endian '>'      byte swap inside words
    DCBA   big-endian    '<'      both

For 16-bit types this reduces to AB (ABCD, CDAB) and BA (BADC, DCBA), as DESIGN.md says.
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from bridge.errors import CodecError
from bridge.registers import (
    BIT_TABLES,
    BYTE_ORDERS,
    POINT_TYPES,
    ByteOrder,
    PointType,
    Table,
    Value,
    register_count,
)

__all__ = [
    "BIT_TABLES",
    "BYTE_ORDERS",
    "POINT_TYPES",
    "BlockLayout",
    "ByteOrder",
    "Field",
    "PointType",
    "Table",
    "Value",
    "decode",
    "encode",
    "register_count",
    "shortest_float32",
]

# (struct code, registers) per numeric type; bool on a register table reads one uint16.
_NUMERIC: Mapping[PointType, tuple[str, int]] = {
    "bool": ("H", 1),
    "int16": ("h", 1),
    "uint16": ("H", 1),
    "int32": ("i", 2),
    "uint32": ("I", 2),
    "int64": ("q", 4),
    "uint64": ("Q", 4),
    "float32": ("f", 2),
    "float64": ("d", 4),
}
_LE_WORDS: frozenset[ByteOrder] = frozenset({"CDAB", "BADC"})
_LE_VALUE: frozenset[ByteOrder] = frozenset({"CDAB", "DCBA"})


@dataclass(frozen=True, slots=True)
class Field:
    """Where one point's value sits in a block of registers, and how to read it."""

    offset: int  # registers from the block's first address
    type: PointType
    byte_order: ByteOrder = "ABCD"
    bit: int | None = None
    count: int | None = None  # registers, strings only

    @property
    def size(self) -> int:
        return register_count(self.type, self.count)


@dataclass(frozen=True, slots=True)
class _Reader:
    byte_offset: int
    little_words: bool
    unpack: struct.Struct | None  # None for strings
    bit: int | None
    is_bool: bool
    string_bytes: int


@functools.lru_cache(maxsize=4096)
def _reader(field: Field) -> _Reader:
    # Cached: devices of one map repeat the same fields, and a reader with its Struct is
    # ~250 bytes (3.6 MiB at 500 devices x 30 points); they are immutable, so shared.
    if field.type == "string":
        size = register_count("string", field.count)
        # Strings are sequences of bytes, not numbers: only the byte swap inside words applies.
        swap = field.byte_order in ("BADC", "DCBA")
        return _Reader(field.offset * 2, swap, None, None, False, size * 2)
    code, _ = _NUMERIC[field.type]
    endian = "<" if field.byte_order in _LE_VALUE else ">"
    return _Reader(
        field.offset * 2,
        field.byte_order in _LE_WORDS,
        struct.Struct(endian + code),
        field.bit,
        field.type == "bool",
        0,
    )


class BlockLayout:
    """A block's fields compiled once; `decode` turns the block's words into values.

    Built when the plan is made, so a poll only packs the words and runs `unpack_from`.
    """

    __slots__ = ("_need_be", "_need_le", "_pack_be", "_pack_le", "_readers", "size")

    def __init__(self, size: int, fields: Sequence[Field]) -> None:
        for f in fields:
            if f.offset < 0 or f.offset + f.size > size:
                raise CodecError(f"field at offset {f.offset} does not fit a {size}-register block")
        self.size = size
        self._readers = tuple(_reader(f) for f in fields)
        self._need_be = any(not r.little_words for r in self._readers)
        self._need_le = any(r.little_words for r in self._readers)
        self._pack_be = struct.Struct(f">{size}H")
        self._pack_le = struct.Struct(f"<{size}H")

    def decode(self, registers: Sequence[int]) -> list[Value]:
        """Values of every field, in field order; raises CodecError on a short reply."""
        if len(registers) < self.size:
            raise CodecError(f"expected {self.size} registers, got {len(registers)}")
        words = registers if len(registers) == self.size else registers[: self.size]
        try:
            big = self._pack_be.pack(*words) if self._need_be else b""
            little = self._pack_le.pack(*words) if self._need_le else b""
        except struct.error as exc:
            raise CodecError(f"register value out of range: {exc}") from None
        out: list[Value] = []
        for r in self._readers:
            buf = little if r.little_words else big
            if r.unpack is None:
                raw = buf[r.byte_offset : r.byte_offset + r.string_bytes]
                out.append(raw.decode("latin-1").rstrip("\x00 "))
                continue
            value = r.unpack.unpack_from(buf, r.byte_offset)[0]
            if r.bit is not None:
                bit_set = (value >> r.bit) & 1
                out.append(bool(bit_set) if r.is_bool else bit_set)
            elif r.is_bool:
                out.append(value != 0)
            else:
                out.append(value)
        return out


@functools.lru_cache(maxsize=1024)
def block_layout(size: int, fields: tuple[Field, ...]) -> BlockLayout:
    """The layout of a block, shared by every request with the same fields (the devices of
    one map): a layout is immutable once built."""
    return BlockLayout(size, fields)


def shortest_float32(value: float) -> float:
    """`value` as the float64 with the shortest repr that still packs to the same float32.

    A float32 widened to float64 prints all its binary digits (229.87391662597656); what the
    device meant is the shortest decimal that converts back to the same 4 bytes (229.87392).
    9 significant digits always suffice for float32; NaN and infinities are returned as they are.
    """
    if not math.isfinite(value):
        return value
    wire = _FLOAT32.pack(value)
    for digits in range(1, 10):
        short = float(f"{value:.{digits}g}")
        try:
            if _FLOAT32.pack(short) == wire:
                return short
        except OverflowError:  # rounded up past float32's largest finite value
            continue
    return value


_FLOAT32 = struct.Struct(">f")


def decode(field: Field, registers: Sequence[int]) -> Value:
    """One field's value from its own registers (offset ignored). For the CLI and tests."""
    placed = Field(0, field.type, field.byte_order, field.bit, field.count)
    return BlockLayout(placed.size, (placed,)).decode(registers)[0]


# The smallest double that float32 rounds to infinity: anything below rounds to a finite value
# (3.4028235e38, how float32's largest value prints, is one of them).
FLOAT32_OVERFLOW = 3.4028235677973366e38

INT_RANGES: Mapping[PointType, tuple[int, int]] = {
    "bool": (0, 1),
    "int16": (-(2**15), 2**15 - 1),
    "uint16": (0, 2**16 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "uint32": (0, 2**32 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "uint64": (0, 2**64 - 1),
}


def encode(field: Field, value: Value) -> list[int]:
    """The registers that hold `value` for `field`, in its byte order.

    Raises CodecError naming the problem when the value does not fit the type: writes are
    checked here before anything reaches the wire.
    """
    if field.type == "string":
        if not isinstance(value, str):
            raise CodecError(f"expected a string, got {value!r}")
        size = register_count("string", field.count)
        try:
            raw = value.encode("latin-1")
        except UnicodeEncodeError:
            raise CodecError("string has characters outside Latin-1") from None
        if len(raw) > size * 2:
            raise CodecError(f"string longer than {size * 2} characters")
        raw = raw.ljust(size * 2, b"\x00")
        fmt = "<" if field.byte_order in ("BADC", "DCBA") else ">"
        return list(struct.unpack(f"{fmt}{size}H", raw))
    if field.bit is not None:
        raise CodecError("a single bit of a register cannot be written on its own")
    code, size = _NUMERIC[field.type]
    number = _number_for(field.type, value)
    endian = "<" if field.byte_order in _LE_VALUE else ">"
    try:
        raw = struct.pack(endian + code, number)
    except (struct.error, OverflowError) as exc:
        raise CodecError(f"{value!r} does not fit {field.type}: {exc}") from None
    words = "<" if field.byte_order in _LE_WORDS else ">"
    return list(struct.unpack(f"{words}{size}H", raw))


def _number_for(type_: PointType, value: Value) -> int | float:
    if isinstance(value, str):
        raise CodecError(f"expected a number for {type_}, got {value!r}")
    if type_ in ("float32", "float64"):
        number = float(value)
        if type_ == "float32" and math.isfinite(number) and abs(number) >= FLOAT32_OVERFLOW:
            raise CodecError(f"{value!r} is outside the float32 range")
        return number
    if isinstance(value, float):
        if not value.is_integer():
            raise CodecError(f"{value!r} is not a whole number, as {type_} needs")
        value = int(value)
    low, high = INT_RANGES[type_]
    if not low <= int(value) <= high:
        raise CodecError(f"{value!r} is outside the {type_} range {low}..{high}")
    return int(value)
