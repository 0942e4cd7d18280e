"""Sparkplug B 3.0 payloads: points as metrics; births, data and deaths; topics. Pure.

The edge node session (bridge.mqtt) decides when a message goes out and keeps `seq` and
`bdSeq`; this module decides what the bytes are, encoded with the protobuf classes that
scripts/gen-proto generates from proto/sparkplug_b.proto (never by hand). Incoming commands
are parsed in bridge.core.sparkplug_commands.

Metrics (DESIGN.md "Northbound standards"): every point of a device is a metric named after
the point, with the datatype its engineering value has (`datatype`), an alias, and in births
the properties `engUnit` (String, when the point has a unit) and `Quality` (Int32: 192 good,
500 stale, 0 bad). Aliases are unique across the whole edge node, as the specification asks
of them, numbered from 1 in config order the first time, and kept for good: the edge node
saves them in its state dir (bridge.mqtt.sparkplug.AliasBook) and a metric added later gets
a number never given before, so readings buffered across a reload or a restart with another
config still name their own metrics. A config that changes any device or point changes
`NodeMetrics.table`, and the session must then republish every birth. The node's own metrics,
bdSeq and Node Control/Rebirth, go by name only: a host must be able to ask for a rebirth
knowing no alias (tck-id-operational-behavior-data-commands-rebirth-name-aliases).

Integers travel in the unsigned fields the datatype names; signed ones as two's complement
of their own width (Int16 -1 is int_value 65535), as Eclipse Tahu's Python library and
pysparkplug write them (Tahu's Java library sign-extends to 32 bits, which its decoder
truncates back; bridge.core.sparkplug_commands accepts both forms). A value that does not fit
its metric (a decoded reading never is one) goes out as null with Quality 0 (bad),
rather than failing the message for its other metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, Literal, TypeAlias

from bridge.core import sparkplug_pb2 as pb
from bridge.core.codec import Value
from bridge.core.sparkplug_frame import Frame, Frames
from bridge.core.sparkplug_types import WIRE, Wire, datatype

if TYPE_CHECKING:
    from bridge.config import Device, Point

NAMESPACE = "spBv1.0"
BD_SEQ = "bdSeq"
REBIRTH = "Node Control/Rebirth"
FIRST_ALIAS = 1  # not 0, which a host reading the protobuf without presence takes for unset
SEQ_LIMIT = 256  # seq and bdSeq run 0..255, then wrap to 0

NodeMessage: TypeAlias = Literal["NBIRTH", "NDEATH", "NDATA", "NCMD"]
DeviceMessage: TypeAlias = Literal["DBIRTH", "DDEATH", "DDATA", "DCMD"]
_NODE_MESSAGES = frozenset({"NBIRTH", "NDEATH", "NDATA", "NCMD"})
_DEVICE_MESSAGES = frozenset({"DBIRTH", "DDEATH", "DDATA", "DCMD"})
_RESERVED = frozenset("/+#")


class Quality(IntEnum):
    """The `Quality` property's values (the specification's quality codes)."""

    BAD = 0
    GOOD = 192
    STALE = 500


# --- topics -----------------------------------------------------------------------------------


def topic(
    group_id: str,
    message_type: NodeMessage | DeviceMessage,
    edge_node_id: str,
    device_id: str | None = None,
) -> str:
    """`spBv1.0/<group_id>/<message_type>/<edge_node_id>[/<device_id>]`.

    Device messages need a device id and node messages must not have one; ids must be
    non-empty and free of `/`, `+` and `#` (ValueError otherwise: config validation refuses
    such ids long before this runs).
    """
    if message_type in _DEVICE_MESSAGES:
        if device_id is None:
            raise ValueError(f"{message_type} needs a device id")
    elif message_type not in _NODE_MESSAGES:
        raise ValueError(f"{message_type!r} is no node or device message (STATE: state_topic)")
    elif device_id is not None:
        raise ValueError(f"{message_type} takes no device id")
    ids = (group_id, edge_node_id) if device_id is None else (group_id, edge_node_id, device_id)
    for part in ids:
        _check_id(part)
    head = f"{NAMESPACE}/{group_id}/{message_type}/{edge_node_id}"
    return head if device_id is None else f"{head}/{device_id}"


def command_filters(group_id: str, edge_node_id: str) -> tuple[str, str]:
    """What the edge node subscribes to for commands: its NCMD topic, and DCMD for any device."""
    return (
        topic(group_id, "NCMD", edge_node_id),
        f"{NAMESPACE}/{group_id}/DCMD/{edge_node_id}/+",
    )


def state_topic(host_id: str) -> str:
    """`spBv1.0/STATE/<host_id>`: where a primary host application says it is online."""
    _check_id(host_id)
    return f"{NAMESPACE}/STATE/{host_id}"


def _check_id(part: str) -> None:
    if not part or _RESERVED.intersection(part):
        raise ValueError(f"{part!r} is not a Sparkplug id (empty, or has '/', '+' or '#')")


def next_seq(seq: int) -> int:
    """The sequence number after `seq` (for both seq and bdSeq): up by one, 255 wraps to 0."""
    return (seq + 1) % SEQ_LIMIT


# --- aliases: the edge node's metrics ---------------------------------------------------------


def metric_key(device: str, point: str, kind: int) -> str:
    """What an alias is kept for: a device's point of one datatype (a point whose datatype
    changes is a new metric, so a buffered reading of the old type never travels under it)."""
    return f"{device}/{point}/{kind}"


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One point as a metric: its alias and datatype, fixed for a session."""

    point: Point
    alias: int
    datatype: int
    wire: Wire  # WIRE[datatype], looked up once

    @property
    def name(self) -> str:
        return self.point.name


class DeviceMetrics:
    """One device's metrics, found by name or alias (`by_name(name)`, `by_alias(alias)`: the
    metric, or None)."""

    __slots__ = ("_by_alias", "_frame", "_frames", "aliases", "by_name", "metrics", "name")

    def __init__(
        self, name: str, metrics: tuple[MetricSpec, ...], frames: Frames | None = None
    ) -> None:
        """`frames`: the node's DDATA frames (bridge.core.sparkplug_frame.Frames)."""
        self.name = name
        self.metrics = metrics
        self.aliases = tuple(m.alias for m in metrics)
        # dict lookups themselves, not methods around them: by_name runs once per value sent
        self.by_name: Callable[[str], MetricSpec | None] = {m.name: m for m in metrics}.get
        # Aliases are consecutive unless kept across a config change: then found by position,
        # with no dict per device (~1.2 KB each, 0.6 MiB at 500 devices).
        first = self.aliases[0] if metrics else 0
        consecutive = self.aliases == tuple(range(first, first + len(metrics)))
        self._by_alias = None if consecutive else {m.alias: m for m in metrics}
        self._frames = Frames() if frames is None else frames
        self._frame: Frame | None = None

    def by_alias(self, alias: int) -> MetricSpec | None:
        """The metric with this alias (commands and replays ask, not every value sent)."""
        if self._by_alias is not None:
            return self._by_alias.get(alias)
        i = alias - self.aliases[0] if self.metrics else -1
        return self.metrics[i] if 0 <= i < len(self.metrics) else None

    @property
    def frame(self) -> Frame:
        """The device's DDATA frame, kept between polls (made on first use): its own, or
        beyond the node's budget shared with its other devices of this shape."""
        if self._frame is None:
            self._frame = self._frames.frame(tuple((m.name, m.datatype) for m in self.metrics))
        return self._frame


class NodeMetrics:
    """Every metric of the edge node, with its alias (see the module docstring).

    `known`: aliases given before (`metric_key` → alias, from the state dir), which metrics
    keep; any other metric gets the next alias not given yet (`next_alias` on), so a reload or
    a restart with a changed config never moves an alias to another metric, and readings
    buffered before it still name their own metrics. Without `known`, config order from 1.
    """

    __slots__ = ("devices", "next_alias")

    def __init__(
        self,
        devices: Iterable[Device],
        known: Mapping[str, int] | None = None,
        next_alias: int = FIRST_ALIAS,
        *,
        frames: Frames | None = None,
    ) -> None:
        """`frames`: where the devices' DDATA frames come from (default: a new budget)."""
        known = known or {}
        next_alias = max([next_alias, *(a + 1 for a in known.values())])
        found: dict[str, DeviceMetrics] = {}
        frames = Frames() if frames is None else frames
        used: set[int] = set()
        for device in devices:
            specs = []
            for point in device.points:
                kind = datatype(point)
                key = metric_key(device.name, point.name, kind)
                alias = known.get(key)
                if alias is None or alias in used:  # (a hand-edited file may repeat one)
                    alias, next_alias = next_alias, next_alias + 1
                used.add(alias)
                specs.append(MetricSpec(point, alias, kind, WIRE[kind]))
            found[device.name] = DeviceMetrics(device.name, tuple(specs), frames)
        self.devices: Mapping[str, DeviceMetrics] = found
        self.next_alias = next_alias

    def device(self, name: str) -> DeviceMetrics | None:
        return self.devices.get(name)

    @property
    def keys(self) -> dict[str, int]:
        """metric_key → alias of every metric here: made when asked (once a config), not
        kept (~1.5 MiB of strings at 500 devices x 30 points)."""
        return {
            metric_key(d.name, m.name, m.datatype): m.alias
            for d in self.devices.values() for m in d.metrics
        }

    @property
    def table(self) -> tuple[tuple[str, str, int, int], ...]:
        """(device, metric, alias, datatype) of every metric: when it changes, rebirth all."""
        return tuple(
            (d.name, m.name, m.alias, m.datatype) for d in self.devices.values() for m in d.metrics
        )


# --- payloads ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sample:
    """A point's value for a birth: what it read (None: nothing yet), when, and how good."""

    value: Value | None
    ts: int
    quality: Quality = Quality.GOOD


def nbirth(*, bd_seq: int, seq: int, ts: int) -> bytes:
    """The edge node's birth: bdSeq (Int64, as its CONNECT's will carried it) and
    `Node Control/Rebirth` (Boolean false), stamped `ts`, with `seq` (0 after a connect)."""
    payload = pb.Payload(timestamp=ts, seq=_seq(seq))
    payload.metrics.add(name=BD_SEQ, timestamp=ts, datatype=pb.Int64, long_value=_seq(bd_seq))
    payload.metrics.add(name=REBIRTH, timestamp=ts, datatype=pb.Boolean, boolean_value=False)
    return payload.SerializeToString()


def ndeath(*, bd_seq: int, ts: int) -> bytes:
    """The edge node's death (its will): the bdSeq metric alone, by name, and no seq."""
    payload = pb.Payload(timestamp=ts)
    payload.metrics.add(name=BD_SEQ, timestamp=ts, datatype=pb.Int64, long_value=_seq(bd_seq))
    return payload.SerializeToString()


def dbirth(device: DeviceMetrics, last: Mapping[str, Sample], *, seq: int, ts: int) -> bytes:
    """A device's birth: every metric with name, alias, datatype, its last value (null when
    `last` has none: Quality bad) and the properties engUnit and Quality."""
    payload = pb.Payload(timestamp=ts, seq=_seq(seq))
    for spec in device.metrics:
        sample = last.get(spec.name)
        metric = payload.metrics.add(name=spec.name, alias=spec.alias, datatype=spec.datatype)
        if sample is None or sample.value is None:
            metric.timestamp = sample.ts if sample is not None else ts
            quality = sample.quality if sample is not None else Quality.BAD
            metric.is_null = True
        else:
            metric.timestamp = sample.ts
            quality = sample.quality if _put(metric, spec, sample.value) else Quality.BAD
        props = metric.properties
        if spec.point.unit is not None:
            props.keys.append("engUnit")
            props.values.add(type=pb.String, string_value=spec.point.unit)
        _quality(metric, quality)
    return payload.SerializeToString()


def ddata(
    device: DeviceMetrics,
    values: Mapping[str, Value],
    *,
    acquired: int,
    seq: int | None,
    ts: int,
    historical: bool = False,
    quality: Quality = Quality.GOOD,
) -> bytes:
    """A device's data: per value its alias, the value and `acquired` (no name, no datatype).

    The metric timestamp goes with every value, although all of them share `acquired`: the
    specification asks for it in every DDATA metric (tck-id-payloads-name-birth-data-requirement).
    `seq` None leaves the field out (the buffer's form: bridge.core.sparkplug_stored).
    `historical` marks replayed readings (is_historical); a `quality` other than good goes
    with every metric as its Quality property. Names the birth did not define are left out:
    a host could not resolve them.

    A poll of every metric, all of them good and fitting, is the common case: it reuses the
    device's frame (bridge.core.sparkplug_frame); anything else builds a payload of its own.
    """
    if not historical and quality == Quality.GOOD:
        frame = device.frame
        if frame.fill(values, acquired, device.aliases):
            whole = frame.payload
            whole.timestamp = ts
            if seq is None:
                whole.ClearField("seq")
            else:
                whole.seq = _seq(seq)
            return whole.SerializeToString()
    payload = pb.Payload(timestamp=ts) if seq is None else pb.Payload(timestamp=ts, seq=_seq(seq))
    add, by_name, flagged = payload.metrics.add, device.by_name, quality != Quality.GOOD
    for name, value in values.items():
        spec = by_name(name)
        if spec is None:
            continue
        metric = add()  # attribute by attribute: twice as fast as add(**fields) in upb
        metric.alias = spec.alias
        metric.timestamp = acquired
        if historical:
            metric.is_historical = True
        if not _put(metric, spec, value):
            _quality(metric, Quality.BAD)
        elif flagged:
            _quality(metric, quality)
    return payload.SerializeToString()


def ddeath(*, seq: int, ts: int) -> bytes:
    """A device's death: a timestamp and the next seq, no metrics."""
    return pb.Payload(timestamp=ts, seq=_seq(seq)).SerializeToString()


def _quality(metric: pb.Payload.Metric, quality: Quality) -> None:
    metric.properties.keys.append("Quality")
    metric.properties.values.add(type=pb.Int32, int_value=int(quality))


def _put(metric: pb.Payload.Metric, spec: MetricSpec, value: Value) -> bool:
    """Set `value` in the field `spec`'s datatype uses; is_null (and False) if it cannot be."""
    wire = spec.wire
    encoded = wire.encode(value)
    if encoded is not None:
        try:
            setattr(metric, wire.field, encoded)
            return True
        except (ValueError, TypeError):  # a float beyond float32, a string that is no UTF-8
            pass
    metric.is_null = True
    return False


def _seq(number: int) -> int:
    if not 0 <= number < SEQ_LIMIT:
        raise ValueError(f"sequence number {number} is outside 0..255")
    return number
