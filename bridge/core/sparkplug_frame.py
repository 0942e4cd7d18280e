"""A device's Sparkplug DDATA kept between polls (`Frame`): the cheap way to encode a poll of
every point. Pure.

bridge.core.sparkplug.ddata uses a device's frame for a good poll of every metric and builds
a payload of its own for anything else; both encode with the protobuf package (never by hand).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bridge.core import sparkplug_pb2 as pb
from bridge.core.codec import Value
from bridge.core.sparkplug_types import WIRE, Wire

# Metrics whose devices get a frame of their own (~400 bytes a metric: 0.8 MiB); devices
# beyond share their shape's frame. Measured (10 devices of one 100-point shape, alternating):
# a shared frame costs ~0.15 µs a value more (an alias store per metric, ~145 ns in upb).
# 2048 covers the 10 x 100 bench twice over; 500 x 30 needed the 0.8 MiB of 4096 to stay
# under 45 MiB (bench/rss.py).
FRAME_BUDGET = 2048


class Frames:
    """A node's DDATA frames: a frame of its own for each device while they hold at most
    `budget` metrics in all, then one frame shared by the devices of each shape (500 devices
    of one 30-point map hold 0.8 MiB of frames instead of 5.7)."""

    __slots__ = ("_shared", "budget", "kept")

    def __init__(self, budget: int = FRAME_BUDGET) -> None:
        self.budget = budget
        self.kept = 0  # metrics in frames of their own
        self._shared: dict[tuple[tuple[str, int], ...], Frame] = {}

    def frame(self, shape: tuple[tuple[str, int], ...]) -> Frame:
        """A frame for a device of `shape` ((name, datatype) of its metrics, in order)."""
        if self.kept + len(shape) <= self.budget:
            self.kept += len(shape)
            return Frame(shape)
        frame = self._shared.get(shape)
        if frame is None:
            frame = self._shared[shape] = Frame(shape)
        return frame


class Frame:
    """The DDATA of every metric of a device, or of the devices of one shape (their points'
    names and datatypes in order: the devices of one map), kept between polls: what a poll of
    every point costs is a timestamp and a value set per metric, then one serialization.
    A shared frame also sets each device's aliases (`fill`; a payload is serialized before
    the next fill): see `Frames`.

    Measured (bench/sparkplug.py, upb): a Metric made per value (`add()`, then its fields)
    costs about twice the serialization of the whole payload, and `add()` alone more than
    setting two fields of a Metric that is already there. The frame's metrics have their
    alias set per fill (unless the same device's again), and `fill` sets the rest of every
    one, so nothing of an earlier poll survives.

    Metrics are grouped by datatype: integer groups (most Modbus points) check their bounds
    at once (min and max, in C), leave the rest to protobuf and only set fields; the others
    convert value by value with their datatype's `encode`. Anything unusual (a value that
    does not fit, a poll of some points only) returns False, and `ddata` takes its general
    path, which says per metric what it can.
    """

    __slots__ = ("_aliases", "_groups", "_made", "_ordered", "payload", "size")

    def __init__(self, metrics: Sequence[tuple[str, int]]) -> None:
        """`metrics`: every metric of the shape as (name, datatype)."""
        self.payload = pb.Payload()
        self.size = len(metrics)
        add = self.payload.metrics.add
        made = [add() for _ in metrics]
        self._made = made
        self._aliases: Sequence[int] = ()  # those the metrics carry now
        names = [name for name, _ in metrics]
        # the values in metric order, as a tuple; KeyError when one is missing
        self._ordered: Callable[[Mapping[str, Value]], tuple[Value, ...]] = (
            operator.itemgetter(*names) if len(names) > 1
            else lambda values: tuple(values[name] for name in names)
        )
        kinds: dict[int, list[int]] = {}
        for index, (_, kind) in enumerate(metrics):
            kinds.setdefault(kind, []).append(index)
        whole = len(kinds) == 1
        self._groups = tuple(
            _Group(
                None if whole else _picker(indexes), [made[i] for i in indexes], WIRE[kind],
                _INT_RANGES.get(kind),
            )
            for kind, indexes in kinds.items()
        )

    def fill(self, values: Mapping[str, Value], acquired: int, aliases: Sequence[int]) -> bool:
        """Every metric's value from `values`, acquired then, under one device's `aliases`
        (in metric order); False (the frame half filled, not to be sent) unless `values`
        names every metric and each value fits its own."""
        if len(values) != self.size:
            return False
        try:
            ordered = self._ordered(values)
        except KeyError:
            return False
        if aliases is not self._aliases:
            for metric, alias in zip(self._made, aliases, strict=True):
                metric.alias = alias
            self._aliases = aliases
        return all(group.fill(ordered, acquired) for group in self._groups)


def _picker(indexes: list[int]) -> Callable[[tuple[Value, ...]], tuple[Value, ...]]:
    if len(indexes) > 1:
        return operator.itemgetter(*indexes)
    index = indexes[0]
    return lambda ordered: (ordered[index],)


# Integer datatypes: the range a value must be in, and its value field's own range (where
# protobuf itself refuses a value, raising ValueError), and for signed ones the mask that makes
# a negative value its two's complement.
_INT_RANGES: Mapping[int, tuple[int, int, int, int, int | None]] = {
    pb.Int16: (-(1 << 15), 1 << 15, 0, 1 << 32, (1 << 16) - 1),
    pb.Int32: (-(1 << 31), 1 << 31, 0, 1 << 32, (1 << 32) - 1),
    pb.Int64: (-(1 << 63), 1 << 63, 0, 1 << 64, (1 << 64) - 1),
    pb.UInt16: (0, 1 << 16, 0, 1 << 32, None),
    pb.UInt32: (0, 1 << 32, 0, 1 << 32, None),
    pb.UInt64: (0, 1 << 64, 0, 1 << 64, None),
}


@dataclass(frozen=True, slots=True)
class _Group:
    """The frame's metrics of one datatype: where their values are, and how they travel."""

    pick: Callable[[tuple[Value, ...]], tuple[Value, ...]] | None  # None: every value
    metrics: list[pb.Payload.Metric]
    wire: Wire
    ints: tuple[int, int, int, int, int | None] | None  # integer datatypes: see _INT_RANGES

    def fill(self, ordered: tuple[Value, ...], acquired: int) -> bool:
        values: Sequence[Any] = ordered if self.pick is None else self.pick(ordered)
        if self.ints is None:
            values = list(map(self.wire.encode, values))
            if None in values:
                return False
        else:
            # No conversion per value: what is no int (a float, a bool) protobuf refuses with
            # TypeError, and only the bounds it does not check itself are checked here, at once.
            low, high, field_low, field_high, mask = self.ints
            try:
                if high < field_high and max(values) >= high:
                    return False
                if low < field_low and min(values) < field_low:
                    if min(values) < low:
                        return False
                    values = [v & mask for v in values]
            except TypeError:  # a str among ints: no order
                return False
        try:
            _SETTERS.get(self.wire.field, _set_any)(self.metrics, values, acquired, self.wire.field)
        except (ValueError, TypeError):  # out of the field's range, no int, a float beyond
            return False                 # float32, a string that is no UTF-8
        return True


# Setting each metric's timestamp and value is most of a frame's cost: the usual fields are
# stored by name (an attribute store, ~10 % cheaper per metric than setattr()).
def _set_ints(metrics: list[pb.Payload.Metric], values: Sequence[Any], at: int, _: str) -> None:
    for metric, value in zip(metrics, values, strict=True):
        metric.timestamp = at
        metric.int_value = value


def _set_floats(metrics: list[pb.Payload.Metric], values: Sequence[Any], at: int, _: str) -> None:
    for metric, value in zip(metrics, values, strict=True):
        metric.timestamp = at
        metric.float_value = value


def _set_any(metrics: list[pb.Payload.Metric], values: Sequence[Any], at: int, field: str) -> None:
    for metric, value in zip(metrics, values, strict=True):
        metric.timestamp = at
        setattr(metric, field, value)


_SETTERS = {"int_value": _set_ints, "float_value": _set_floats}
