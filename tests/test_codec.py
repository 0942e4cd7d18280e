"""Register codec: every type in every byte order, both directions."""

from __future__ import annotations

import math
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.core.codec import BYTE_ORDERS, BlockLayout, ByteOrder, Field, PointType, decode, encode
from bridge.errors import CodecError

INT_LIMITS: dict[PointType, tuple[int, int]] = {
    "int16": (-(2**15), 2**15 - 1),
    "uint16": (0, 2**16 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "uint32": (0, 2**32 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "uint64": (0, 2**64 - 1),
}
orders = st.sampled_from(BYTE_ORDERS)


class TestKnownWireBytes:
    """Decodes match what real devices send, byte for byte."""

    @pytest.mark.parametrize(
        ("order", "words"),
        [
            ("ABCD", [0x4366, 0x8000]),
            ("CDAB", [0x8000, 0x4366]),
            ("BADC", [0x6643, 0x0080]),
            ("DCBA", [0x0080, 0x6643]),
        ],
    )
    def test_float32_230_5_in_every_order(self, order: ByteOrder, words: list[int]) -> None:
        """230.5 V is 0x43668000 on the wire; each order names where those bytes arrive."""
        assert decode(Field(0, "float32", order), words) == 230.5
        assert encode(Field(0, "float32", order), 230.5) == words

    def test_uint32_cdab_is_low_word_first(self) -> None:
        """CDAB (word swap) puts the low word first, as many meters do."""
        assert decode(Field(0, "uint32", "CDAB"), [0x0002, 0x0001]) == 0x00010002

    def test_16_bit_orders_reduce_to_ab_and_ba(self) -> None:
        """ABCD/CDAB read a register as AB, BADC/DCBA as BA."""
        assert decode(Field(0, "uint16", "ABCD"), [0x1234]) == 0x1234
        assert decode(Field(0, "uint16", "CDAB"), [0x1234]) == 0x1234
        assert decode(Field(0, "uint16", "BADC"), [0x1234]) == 0x3412
        assert decode(Field(0, "uint16", "DCBA"), [0x1234]) == 0x3412

    def test_int16_is_signed(self) -> None:
        """0xFFFF in an int16 register is -1, not 65535."""
        assert decode(Field(0, "int16"), [0xFFFF]) == -1

    def test_float64_abcd(self) -> None:
        """A float64 spans four registers, most significant first in ABCD."""
        words = list(struct.unpack(">4H", struct.pack(">d", -1234.5678)))
        assert decode(Field(0, "float64"), words) == -1234.5678

    def test_string_strips_padding(self) -> None:
        """Strings are two characters a register, NUL and space padding removed."""
        assert decode(Field(0, "string", count=3), [0x5341, 0x4D31, 0x2000]) == "SAM1"

    def test_string_with_swapped_bytes(self) -> None:
        """Some devices store strings byte-swapped; BADC reads them right."""
        assert decode(Field(0, "string", "BADC", count=2), [0x4153, 0x314D]) == "SAM1"

    def test_bit_of_a_register(self) -> None:
        """`bit: n` reads one bit of a 16-bit register as a bool."""
        assert decode(Field(0, "bool", bit=2), [0b0100]) is True
        assert decode(Field(0, "bool", bit=1), [0b0100]) is False

    def test_bool_register_without_bit_is_nonzero(self) -> None:
        """A bool over a whole register is true for any non-zero value."""
        assert decode(Field(0, "bool"), [7]) is True
        assert decode(Field(0, "bool"), [0]) is False


class TestBlockLayout:
    """One compiled layout decodes every field of a block at its offset."""

    def test_mixed_fields_at_offsets(self) -> None:
        """Fields of different types and orders decode from one block of words."""
        words = (
            encode(Field(0, "float32", "CDAB"), 49.5)
            + [0]  # a hole the planner chose to read across
            + encode(Field(0, "int16"), -40)
            + encode(Field(0, "uint64", "DCBA"), 2**40 + 7)
        )
        layout = BlockLayout(
            len(words),
            [
                Field(0, "float32", "CDAB"),
                Field(3, "int16"),
                Field(4, "uint64", "DCBA"),
                Field(3, "bool", bit=15),
            ],
        )
        assert layout.decode(words) == [49.5, -40, 2**40 + 7, True]

    def test_short_reply_is_a_codec_error(self) -> None:
        """A reply with fewer registers than the block raises CodecError, not IndexError."""
        layout = BlockLayout(4, [Field(2, "float32")])
        with pytest.raises(CodecError, match="expected 4 registers, got 3"):
            layout.decode([0, 0, 0])

    def test_field_outside_block_is_refused(self) -> None:
        """A layout whose field would read past the block cannot be built."""
        with pytest.raises(CodecError):
            BlockLayout(2, [Field(1, "float32")])


class TestEncodeRefusals:
    """Values that do not fit are refused before anything could reach the wire."""

    @pytest.mark.parametrize(
        ("type_", "value", "message"),
        [
            ("uint16", 65536, "outside the uint16 range"),
            ("int16", -32769, "outside the int16 range"),
            ("uint32", -1, "outside the uint32 range"),
            ("int32", 1.5, "not a whole number"),
            ("float32", "fast", "expected a number"),
            ("float32", 1e39, "outside the float32 range"),
        ],
    )
    def test_out_of_range(self, type_: PointType, value: object, message: str) -> None:
        """Each refusal names the problem."""
        with pytest.raises(CodecError, match=message):
            encode(Field(0, type_), value)  # type: ignore[arg-type]

    def test_string_too_long(self) -> None:
        """A string longer than its registers is refused, not truncated."""
        with pytest.raises(CodecError, match="longer than 4 characters"):
            encode(Field(0, "string", count=2), "ABCDE")

    def test_bit_points_cannot_be_written_alone(self) -> None:
        """Writing one bit would clobber the other 15: refused."""
        with pytest.raises(CodecError, match="single bit"):
            encode(Field(0, "bool", bit=3), True)


@given(order=orders, data=st.data(), type_=st.sampled_from(sorted(INT_LIMITS)))
def test_integer_round_trip(order: ByteOrder, data: st.DataObject, type_: PointType) -> None:
    """decode(encode(v)) == v for every integer type, value and byte order."""
    low, high = INT_LIMITS[type_]
    value = data.draw(st.integers(low, high))
    field = Field(0, type_, order)
    words = encode(field, value)
    assert all(0 <= w <= 0xFFFF for w in words)
    assert decode(field, words) == value


@given(order=orders, value=st.floats(width=32, allow_nan=False))
def test_float32_round_trip(order: ByteOrder, value: float) -> None:
    """float32 values survive encode/decode exactly in every byte order."""
    field = Field(0, "float32", order)
    assert decode(field, encode(field, value)) == value


@given(order=orders, value=st.floats(allow_nan=False))
def test_float64_round_trip(order: ByteOrder, value: float) -> None:
    """float64 values survive encode/decode exactly in every byte order."""
    field = Field(0, "float64", order)
    assert decode(field, encode(field, value)) == value


@given(order=orders, value=st.text(st.characters(min_codepoint=1, max_codepoint=255), max_size=8))
def test_string_round_trip(order: ByteOrder, value: str) -> None:
    """Latin-1 strings round-trip, minus the trailing padding the decoder strips."""
    field = Field(0, "string", order, count=4)
    assert decode(field, encode(field, value)) == value.rstrip("\x00 ")


@given(order=orders, words=st.lists(st.integers(0, 0xFFFF), min_size=4, max_size=4))
def test_any_words_decode_without_crashing(order: ByteOrder, words: list[int]) -> None:
    """Whatever a device sends, every type decodes to a value (NaN included) or nothing."""
    for type_ in ("int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64"):
        value = decode(Field(0, type_, order), words)
        assert isinstance(value, int | float)
        if isinstance(value, float) and not math.isnan(value):
            assert decode(Field(0, type_, order), encode(Field(0, type_, order), value)) == value


def test_float32_largest_value_as_printed_round_trips() -> None:
    """3.4028235e38 is how float32's largest value prints (and how a command would give it):
    it rounds to that value, not to infinity, so it is no range error."""
    field = Field(0, "float32")
    assert decode(field, encode(field, 3.4028235e38)) == 3.4028234663852886e38
    with pytest.raises(CodecError, match="outside the float32 range"):
        encode(field, 3.4028235677973366e38)
