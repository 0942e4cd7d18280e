"""Sparkplug DDATA as the buffer stores it: everything but `seq`. Pure.

`seq` counts the edge node's messages in the order they reach the broker, so it is known
only when a message is sent, after the buffer (DESIGN.md "Northbound standards"). A reading
is encoded once, when it is taken, as a DDATA payload without its `seq` field; the session
appends that field when it sends it. Protobuf reads a message's fields in any order, so a
`seq` after the metrics decodes like one in its place: the live path pays one bytes
concatenation per message for Sparkplug, not a second encoding. The field's bytes come from
the protobuf package itself (`SEQ_FIELD`), never from our own varint code.

Readings replayed from the buffer after an outage are re-encoded once more, with
`is_historical` on every metric (their timestamps are the acquisition times already).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from bridge.core import sparkplug as sp
from bridge.core import sparkplug_pb2 as pb
from bridge.core.codec import Value
from bridge.core.messages import Message

if TYPE_CHECKING:
    from bridge.config.model import Device, Sparkplug

# The `seq` field alone, for every seq: what `sequenced` appends.
SEQ_FIELD: tuple[bytes, ...] = tuple(
    pb.Payload(seq=n).SerializeToString() for n in range(sp.SEQ_LIMIT)
)


def unsequenced(payload: bytes) -> bytes:
    """`payload` (encoded with seq 0) without its seq field."""
    tail = SEQ_FIELD[0]
    if payload.endswith(tail):  # fields are written in field-number order: seq (3) is last
        return payload[: -len(tail)]
    message = pb.Payload.FromString(payload)  # never seen; kept correct should that change
    message.ClearField("seq")
    return message.SerializeToString()


def sequenced(stored: bytes, seq: int) -> bytes:
    """A stored payload with its `seq` (0..255) appended: ready for the wire."""
    return stored + SEQ_FIELD[seq]


def historical(stored: bytes, has: Callable[[int], object] | None = None) -> bytes | None:
    """A stored payload with `is_historical` set on every metric (still without seq); with
    `has`, only the metrics whose alias it knows (None when that leaves none)."""
    return _rewrite(stored, has, historical=True)


def known(stored: bytes, has: Callable[[int], object]) -> bytes | None:
    """A stored payload with only the metrics whose alias `has` knows (None: none left)."""
    return _rewrite(stored, has, historical=False)


def _rewrite(stored: bytes, has: Callable[[int], object] | None, *, historical: bool
             ) -> bytes | None:
    message = pb.Payload.FromString(stored)
    metrics = message.metrics
    if has is not None:
        kept = [m for m in metrics if has(m.alias)]
        if not kept:
            return None
        if len(kept) == len(metrics) and not historical:
            return stored
        if len(kept) < len(metrics):
            del metrics[:]
            metrics.extend(kept)
    if historical:
        for metric in metrics:
            metric.is_historical = True
    return message.SerializeToString()


class DeviceData:
    """One device's readings as stored DDATA, and its last values for a DBIRTH.

    Aliases are the edge node's (numbered across every device), so the service hands each
    device its `DeviceMetrics` (`metrics`) once it knows the whole config; until then nothing
    can be encoded and `messages` returns none.
    """

    __slots__ = ("_all_ts", "_last", "_last_ts", "_points", "metrics", "topic")

    def __init__(self, device: Device, settings: Sparkplug) -> None:
        self.topic = sp.topic(settings.group_id, "DDATA", settings.edge_node_id, device.name)
        self.metrics: sp.DeviceMetrics | None = None
        self._points = len({p.name for p in device.points})
        self._last: Mapping[str, Value] = {}
        self._all_ts = 0  # when every point was last read at once
        self._last_ts: dict[str, int] = {}  # those read alone since, when

    def remember(self, values: Mapping[str, Value], ts: int) -> None:
        """Every value read, changed or not: a birth carries each metric's last value.
        `values` is the caller's for good (a poll's own dict, never changed after)."""
        if len(values) == self._points:  # they name points of the device only: every one
            # A poll of every point (the common case): its dict is the last values, kept as
            # it is, and one time for all: no copy, no loop per value.
            self._last = values
            self._all_ts = ts
            self._last_ts.clear()
            return
        self._last = {**self._last, **values}  # never into a poll's own dict
        self._last_ts.update(dict.fromkeys(values, ts))

    def messages(self, values: Mapping[str, Value], ts: int) -> list[Message]:
        """One DDATA without seq for `values` acquired at `ts` (QoS 0, as the spec says)."""
        if not values or self.metrics is None:
            return []
        payload = sp.ddata(self.metrics, values, acquired=ts, seq=None, ts=ts)
        return [Message(self.topic, payload, 0, False, ts)]

    def samples(self, quality: sp.Quality) -> dict[str, sp.Sample]:
        """Every metric's last value (those never read are left out: null in the birth)."""
        at, every = self._last_ts.get, self._all_ts
        return {
            name: sp.Sample(value, at(name, every), quality) for name, value in self._last.items()
        }
