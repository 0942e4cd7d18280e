"""Probe's ranking, unit ranges and the simulator's identification replies: no I/O."""

from __future__ import annotations

import struct

import pytest

from bridge.core.codec import Field, encode
from bridge.core.plausibility import candidates, parse_expect
from bridge.errors import UsageError
from bridge.sim.identity import device_objects, identification_reply, server_id_reply
from bridge.tools.scan import parse_units


def words(type_: str, order: str, value: float) -> list[int]:
    return encode(Field(0, type_, order), value)  # type: ignore[arg-type]


@pytest.mark.parametrize("order", ["ABCD", "CDAB", "BADC", "DCBA"])
def test_a_float32_ranks_its_own_order_first(order: str) -> None:
    first, second = words("float32", order, 230.5), words("float32", order, 230.7)
    best = candidates(first, second)[0]
    assert (best.type, best.byte_order, best.value) == ("float32", order, 230.5)


def test_expect_decides_what_magnitude_cannot() -> None:
    first = words("float32", "CDAB", 49.98)
    ranked = candidates(first, first, expect=(45, 55))
    assert (ranked[0].type, ranked[0].byte_order) == ("float32", "CDAB")
    assert "in expected range" in ranked[0].reasons
    assert all("in expected range" not in c.reasons for c in ranked[1:])


def test_a_counter_in_the_wrong_word_order_jumps() -> None:
    first, second = words("uint32", "CDAB", 70_000), words("uint32", "CDAB", 70_050)
    ranked = candidates(first, second)
    assert (ranked[0].type, ranked[0].byte_order, ranked[0].value) == ("uint32", "CDAB", 70_000)
    abcd = next(c for c in ranked if c.type == "uint32" and c.byte_order == "ABCD")
    assert "unstable across reads" in abcd.reasons


def test_nan_and_denormals_sink() -> None:
    nan = [0x7FC0, 0x0000]
    ranked = candidates(nan, nan)
    nan_reading = next(c for c in ranked if c.type == "float32" and c.byte_order == "ABCD")
    assert nan_reading.reasons == ("not finite",)
    assert ranked[-1] is nan_reading or ranked[-1].score == nan_reading.score
    assert nan_reading.as_json()["value"] is None  # JSON has no NaN
    small = words("uint32", "ABCD", 5)  # a small integer read as a float is denormal
    as_float = next(c for c in candidates(small, small) if c.type == "float32"
                    and c.byte_order == "ABCD")
    assert "denormal" in as_float.reasons


def test_a_small_negative_int16_beats_its_uint16_reading() -> None:
    first = words("int16", "ABCD", -42)
    ranked = candidates(first, first)
    assert (ranked[0].type, ranked[0].value) == ("int16", -42)
    assert {c.byte_order for c in ranked if c.type != "string"} == {"ABCD", "BADC"}


def test_float64_and_text() -> None:
    first = words("float64", "DCBA", 50.02)
    assert candidates(first, first)[0].byte_order == "DCBA"
    text = list(struct.unpack(">3H", b"PX-200"))
    ranked = candidates(text, text)
    assert [(c.type, c.value) for c in ranked] == [("string", "PX-200"), ("string", "XP2-00")]


@pytest.mark.parametrize(
    ("text", "bounds"), [("200..250", (200, 250)), ("-1.5..2", (-1.5, 2)), ("3..3", (3, 3))]
)
def test_parse_expect(text: str, bounds: tuple[float, float]) -> None:
    assert parse_expect(text) == bounds


@pytest.mark.parametrize("text", ["200", "250..200", "a..b", "1..inf", "nan..1"])
def test_parse_expect_refuses(text: str) -> None:
    with pytest.raises(ValueError, match=r"LOW\.\.HIGH"):
        parse_expect(text)


def test_parse_units() -> None:
    assert parse_units("1-3,7, 10-11,2") == [1, 2, 3, 7, 10, 11]
    assert len(parse_units("1-247")) == 247
    for bad in ("0", "248", "3-1", "x", "1-", ""):
        with pytest.raises(UsageError):
            parse_units(bad)


def test_identification_follows_more_follows() -> None:
    objects = device_objects("pump", "ACME", "X1")
    seen: dict[int, bytes] = {}
    next_id, requests = 0, 0
    while True:
        reply = identification_reply(objects, bytes([0x2B, 0x0E, 3, next_id]),
                                     objects_per_reply=3)
        requests += 1
        more, following, count = reply[4], reply[5], reply[6]
        at = 7
        for _ in range(count):
            seen[reply[at]] = reply[at + 2 : at + 2 + reply[at + 1]]
            at += 2 + reply[at + 1]
        if more != 0xFF:
            break
        next_id = following
    assert seen == objects
    assert requests == 3
    basic = identification_reply(objects, bytes([0x2B, 0x0E, 1, 0]))
    assert basic[6] == 3  # VendorName, ProductCode, MajorMinorRevision
    assert identification_reply(objects, bytes([0x2B, 0x0E, 4, 0x42])) == bytes([0xAB, 2])
    assert identification_reply(objects, bytes([0x2B, 0x0E, 9, 0])) == bytes([0xAB, 3])


def test_server_id_reply_is_the_specs_layout() -> None:
    reply = server_id_reply(7, device_objects("m", "Eastron", "SDM630"))
    assert reply[:4] == bytes([0x11, len(reply) - 2, 7, 0xFF])
    assert reply[4:] == b"Eastron SDM630"
