"""Read planner: fewest requests, within the limits, every point covered."""

from __future__ import annotations

import itertools
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from bridge.config import Point
from bridge.core.codec import Field, encode
from bridge.core.planner import plan_device


def pt(name: str, address: int, **kw: Any) -> Point:
    return Point(name=name, address=address, **kw)


def spans(points: list[Point], **kw: Any) -> list[tuple[str, int, int]]:
    groups = plan_device(points, interval=1.0, **kw)
    return [(r.table, r.address, r.count) for g in groups for r in g.requests]


class TestGoldenPlans:
    """Hand-checked cases, config in and requests out."""

    def test_contiguous_points_are_one_request(self) -> None:
        """Three float32s back to back: one read of 6 registers."""
        points = [pt(f"v{i}", i * 2, type="float32") for i in range(3)]
        assert spans(points) == [("holding", 0, 6)]

    def test_gap_within_max_gap_is_bridged(self) -> None:
        """A 10-register hole is read through with max_gap 10."""
        assert spans([pt("a", 0), pt("b", 11)], max_gap=10) == [("holding", 0, 12)]

    def test_gap_beyond_max_gap_splits(self) -> None:
        """An 11-register hole with max_gap 10 costs a second request."""
        assert spans([pt("a", 0), pt("b", 12)], max_gap=10) == [
            ("holding", 0, 1),
            ("holding", 12, 1),
        ]

    def test_max_registers_splits(self) -> None:
        """A device that takes only 10 registers per request gets several."""
        points = [pt(f"r{i}", i) for i in range(25)]
        assert spans(points, max_registers=10) == [
            ("holding", 0, 10),
            ("holding", 10, 10),
            ("holding", 20, 5),
        ]

    def test_a_multi_register_value_is_never_split(self) -> None:
        """A float32 that would straddle the limit starts the next request."""
        points = [pt("a", 0, type="uint16"), pt("b", 9, type="float32")]
        assert spans(points, max_registers=10) == [("holding", 0, 1), ("holding", 9, 2)]

    def test_tables_are_read_separately(self) -> None:
        """Holding, input, coils and discrete inputs never share a request."""
        points = [
            pt("h", 0),
            pt("i", 0, table="input"),
            pt("c", 0, table="coil"),
            pt("d", 5, table="discrete"),
        ]
        assert sorted(spans(points)) == [
            ("coil", 0, 1),
            ("discrete", 5, 1),
            ("holding", 0, 1),
            ("input", 0, 1),
        ]

    def test_bits_of_one_register_share_it(self) -> None:
        """A status word and its bits are one register read."""
        points = [
            pt("word", 10),
            pt("run", 10, type="bool", bit=0),
            pt("trip", 10, type="bool", bit=3),
        ]
        assert spans(points) == [("holding", 10, 1)]

    def test_points_with_their_own_interval_form_a_group(self) -> None:
        """A 1 s point is read in its own group, apart from the 5 s ones."""
        groups = plan_device(
            [pt("slow", 0), pt("fast", 1, interval=1.0), pt("slow2", 2)], interval=5.0
        )
        assert [(g.interval, [str(r) for r in g.requests]) for g in groups] == [
            (1.0, ["holding 1-1 (1, 1 points)"]),
            (5.0, ["holding 0-2 (3, 2 points)"]),
        ]

    def test_coils_coalesce_up_to_2000(self) -> None:
        """Bit tables use the 2000-bit limit, not 125."""
        points = [pt(f"c{i}", i * 10, table="coil") for i in range(150)]
        assert spans(points) == [("coil", 0, 1491)]

    def test_request_decodes_its_points(self) -> None:
        """A request's layout decodes every point at its offset."""
        points = [pt("a", 100, type="float32", byte_order="CDAB"), pt("b", 104, type="int16")]
        (group,) = plan_device(points, interval=1.0)
        (request,) = group.requests

        words = encode(Field(0, "float32", "CDAB"), 1.5) + [0, 0] + encode(Field(0, "int16"), -3)
        assert request.decode(words) == [1.5, -3]


@st.composite
def point_sets(draw: st.DrawFn) -> list[Point]:
    types = st.sampled_from(["uint16", "int32", "float32", "float64", "uint64"])
    addresses = draw(st.lists(st.integers(0, 2000), min_size=1, max_size=40, unique=True))
    return [pt(f"p{i}", a, type=draw(types)) for i, a in enumerate(addresses)]


@given(points=point_sets(), max_registers=st.integers(4, 125), max_gap=st.integers(0, 30))
def test_every_point_covered_within_limits(
    points: list[Point], max_registers: int, max_gap: int
) -> None:
    """Every point lies inside exactly one request, and no request exceeds the limit."""
    groups = plan_device(points, interval=1.0, max_registers=max_registers, max_gap=max_gap)
    requests = [r for g in groups for r in g.requests]
    for request in requests:
        assert request.count <= max_registers
        for p in request.points:
            assert p.address is not None
            assert request.address <= p.address
            assert p.address + p.size <= request.address + request.count
    covered = sorted(p.name for r in requests for p in r.points)
    assert covered == sorted(p.name for p in points)


@given(points=point_sets(), max_registers=st.integers(4, 125), max_gap=st.integers(0, 30))
def test_no_two_neighbouring_requests_could_be_merged(
    points: list[Point], max_registers: int, max_gap: int
) -> None:
    """Each split is forced: the hole exceeds max_gap or the merged read exceeds the limit."""
    groups = plan_device(points, interval=1.0, max_registers=max_registers, max_gap=max_gap)
    requests = sorted((r for g in groups for r in g.requests), key=lambda r: r.address)
    for left, right in itertools.pairwise(requests):
        hole = right.address - (left.address + left.count)
        merged = max(left.address + left.count, right.address + right.count) - left.address
        assert hole > max_gap or merged > max_registers
