"""Read planner: a device's points -> the fewest block reads that cover them. Pure.

Points are grouped by (interval, table); within a group, sorted by address, a block grows while
the next point ends within `max_registers` of the block start and the hole before it is at most
`max_gap` registers. Greedy left-to-right is optimal for this (an interval cover with a span
limit): extending a block never makes a later block start earlier. Reading a hole is cheaper
than a new request on every bus we know (a request costs a round trip or ~4 ms of RTU silence,
a register two bytes), which is why Telegraf and mbmd coalesce the same way.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bridge.core.codec import BIT_TABLES, BlockLayout, Field, Table, Value, block_layout
from bridge.errors import CodecError

if TYPE_CHECKING:  # annotations only: `read URL` plans without loading pydantic's models
    from bridge.config import Point

MAX_READ_REGISTERS = 125  # Modbus spec: FC3/FC4 read at most 125 registers
MAX_READ_BITS = 2000  # Modbus spec: FC1/FC2 read at most 2000 coils/inputs


@dataclass(frozen=True, slots=True, eq=False)
class ReadRequest:
    """One Modbus read: `count` registers (or bits) of `table` from `address`."""

    table: Table
    address: int
    count: int
    points: tuple[Point, ...]
    layout: BlockLayout | None  # None for coil/discrete tables: bits need no struct

    @property
    def is_bits(self) -> bool:
        return self.table in BIT_TABLES

    def decode(self, words: Sequence[int]) -> list[Value]:
        """Raw values of `points`, in order, from this request's reply."""
        if self.layout is not None:
            return self.layout.decode(words)
        if len(words) < self.count:
            raise CodecError(f"expected {self.count} bits, got {len(words)}")
        return [bool(words[_start(p) - self.address]) for p in self.points]

    def __str__(self) -> str:
        end = self.address + self.count - 1
        return f"{self.table} {self.address}-{end} ({self.count}, {len(self.points)} points)"


@dataclass(frozen=True, slots=True)
class Barrier:
    """Registers a device refuses to read, learned at run time: no block may cover them.

    `lo < hi`: the range [lo, hi) itself is refused (a hole in the device's map). `lo == hi`:
    nothing is known to be wrong with any register, but a read spanning address `lo` is refused
    (e.g. a device that cannot read across an internal page boundary); blocks just may not
    straddle it.
    """

    table: Table
    lo: int
    hi: int

    def crossed_by(self, start: int, end: int) -> bool:
        """Whether the block [start, end) would cover or straddle this barrier."""
        if self.lo < self.hi:
            return start < self.hi and end > self.lo
        return start < self.lo < end


@dataclass(frozen=True, slots=True)
class PollGroup:
    """The requests read together every `interval` seconds."""

    interval: float
    requests: tuple[ReadRequest, ...]


def plan_device(
    points: Iterable[Point],
    *,
    interval: float,
    max_registers: int = MAX_READ_REGISTERS,
    max_gap: int = 10,
    max_bits: int = MAX_READ_BITS,
    barriers: Iterable[Barrier] = (),
) -> tuple[PollGroup, ...]:
    """Poll groups for one device, fastest interval first; no block crosses a barrier.

    A point scaled from a factor read live (`scale_from`) has the factor's point read in its
    own poll group too: the factor that scales a value is the one read with it, whatever the
    two points' intervals (a factor in two groups is read, and published, in both)."""
    groups: dict[tuple[float, Table], list[Point]] = {}
    scaled: list[tuple[float, str]] = []
    for point in points:
        if point.address is None:
            continue  # line-instrument points have no registers
        every = point.interval if point.interval is not None else interval
        groups.setdefault((every, point.table), []).append(point)
        if point.scale_from is not None:
            scaled.append((every, point.scale_from))
    if scaled:
        _with_factors(groups, scaled)
    by_interval: dict[float, list[ReadRequest]] = {}
    for (every, table), members in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        limit = max_bits if table in BIT_TABLES else max_registers
        fences = [b for b in barriers if b.table == table]
        by_interval.setdefault(every, []).extend(_blocks(table, members, limit, max_gap, fences))
    return tuple(PollGroup(every, tuple(reqs)) for every, reqs in sorted(by_interval.items()))


def _with_factors(groups: dict[tuple[float, Table], list[Point]],
                  scaled: Iterable[tuple[float, str]]) -> None:
    """Add each factor point to the poll groups (by interval) of the points scaled from it."""
    by_name = {p.name: (every, p) for (every, _), members in groups.items() for p in members}
    for every, name in scaled:
        found = by_name.get(name)
        if found is None or found[0] == every:
            continue  # not a register point of this device (the config says so); or there
        factor = found[1]
        members = groups.setdefault((every, factor.table), [])
        if factor not in members:
            members.append(factor)


def _blocks(
    table: Table, points: Sequence[Point], limit: int, max_gap: int,
    barriers: Sequence[Barrier] = (),
) -> list[ReadRequest]:
    ordered = sorted(points, key=lambda p: (_start(p), p.size))
    blocks: list[list[Point]] = []
    start = end = 0  # the open block spans [start, end)
    for point in ordered:
        p_start = _start(point)
        p_end = p_start + point.size
        if (
            blocks
            and p_start - end <= max_gap
            and max(end, p_end) - start <= limit
            and not any(b.crossed_by(start, max(end, p_end)) for b in barriers)
        ):
            blocks[-1].append(point)
            end = max(end, p_end)
        else:
            blocks.append([point])
            start, end = p_start, p_end
    return [_request(table, members) for members in blocks]


def _start(point: Point) -> int:
    assert point.address is not None  # filtered in plan_device
    return point.address


def request_for(table: Table, members: Sequence[Point]) -> ReadRequest:
    """One read covering exactly `members` (all of `table`), e.g. part of a refused block."""
    return _request(table, sorted(members, key=lambda p: (_start(p), p.size)))


def _request(table: Table, members: Sequence[Point]) -> ReadRequest:
    start = _start(members[0])
    count = max(_start(p) + p.size for p in members) - start
    layout = None
    if table not in BIT_TABLES:
        fields = tuple(Field(_start(p) - start, p.type, p.order, p.bit, p.count) for p in members)
        layout = block_layout(count, fields)
    return ReadRequest(table, start, count, tuple(members), layout)


def registers_spanned(groups: Iterable[PollGroup]) -> int:
    """Registers (or bits) read per cycle of every group, holes included."""
    return sum(req.count for group in groups for req in group.requests)
