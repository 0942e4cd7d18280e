"""Sparkplug commands: NCMD and DCMD payloads -> what to do, or why not. Pure.

NCMD: `Node Control/Rebirth` true asks for every birth again (by name: the NBIRTH gives it
no alias, so that any host can ask).
DCMD: each metric names a point of the device, by alias or by name, and carries a value in the
field its datatype uses. The value becomes the point's engineering value (a number, a bool,
an enum state's name, a string) and is then checked exactly as a `/set` command's is
(bridge.core.writes.check_value: writable, type, enum, min/max, register fit), so a DCMD
write is a `/set` write. Each metric is written or refused on its own, with a one-line reason;
a payload that is no Sparkplug payload at all is a CommandRefused. Nothing else escapes:
bytes off the network never raise a foreign exception here.

Lenient where hosts differ, strict where a guess could write a wrong value: the datatype may
be left out (the specification says commands SHOULD leave it out), but when given it must be
the metric's; UInt32 is read from int_value or long_value (Eclipse Tahu's Java library writes
long_value); Int16 from its 16-bit two's complement or a 32-bit sign extension (Tahu's Java
library again). A value in any other field, a null, NaN or infinity is refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bridge.core import sparkplug_pb2 as pb
from bridge.core.codec import Value, shortest_float32
from bridge.core.sparkplug import REBIRTH, DeviceMetrics, MetricSpec
from bridge.core.writes import CommandRefused, check_value, clip

if TYPE_CHECKING:
    from bridge.config import Point

_FLOAT32_MAX = 3.4028234663852886e38


@dataclass(frozen=True, slots=True)
class Write:
    """A DCMD metric that passed every check: write `value` to `point`."""

    point: Point
    value: Value


@dataclass(frozen=True, slots=True)
class Refusal:
    """A command metric that writes nothing, and why (one line)."""

    metric: str  # as the command named it: its name, or `alias N`
    reason: str


@dataclass(frozen=True, slots=True)
class NodeCommand:
    """What an NCMD asks: a rebirth, and the metrics it carried that this node refuses."""

    rebirth: bool
    refused: tuple[Refusal, ...] = ()


def parse_ncmd(payload: bytes) -> NodeCommand:
    """The node command in `payload`; CommandRefused if it is no Sparkplug payload."""
    rebirth = False
    refused: list[Refusal] = []
    for metric in _metrics(payload):
        try:
            _node_metric(metric)
            rebirth |= bool(_value(metric, pb.Boolean))
        except CommandRefused as exc:
            refused.append(Refusal(_label(metric), exc.reason))
    return NodeCommand(rebirth, tuple(refused))


def parse_dcmd(device: DeviceMetrics, payload: bytes) -> list[Write | Refusal]:
    """Per metric of a DCMD to `device`, in order: the checked write, or why it is refused."""
    out: list[Write | Refusal] = []
    for metric in _metrics(payload):
        try:
            spec = _device_metric(device, metric)
            out.append(Write(spec.point, check_value(spec.point, _value(metric, spec.datatype))))
        except CommandRefused as exc:
            out.append(Refusal(_label(metric), exc.reason))
    return out


def _metrics(payload: bytes) -> Sequence[pb.Payload.Metric]:
    try:
        message = pb.Payload.FromString(payload)
    except Exception:  # DecodeError, whatever a protobuf release may add: bytes off the wire
        raise CommandRefused(
            "payload is not a Sparkplug B payload (protobuf decoding failed)"
        ) from None
    if not message.metrics:
        raise CommandRefused("payload has no metrics")
    return message.metrics


def _node_metric(metric: pb.Payload.Metric) -> None:
    """Refuse anything but `Node Control/Rebirth` (the node's metrics have no aliases)."""
    if _name(metric) != REBIRTH:
        raise CommandRefused(f"unknown node metric: this edge node takes {REBIRTH!r} only")


def _device_metric(device: DeviceMetrics, metric: pb.Payload.Metric) -> MetricSpec:
    name = _name(metric)
    if metric.HasField("alias"):
        spec = device.by_alias(metric.alias)
        if spec is None:
            raise CommandRefused(f"unknown alias {metric.alias}: no metric of {device.name}")
        if name is not None and name != spec.name:
            raise CommandRefused(f"alias {metric.alias} is {spec.name!r}, not {clip(name)!r}")
        return spec
    if name is None:
        raise CommandRefused("metric has neither a name nor an alias")
    spec = device.by_name(name)
    if spec is None:
        raise CommandRefused(f"unknown metric: {device.name} has no point {clip(name)!r}")
    return spec


def _value(metric: pb.Payload.Metric, datatype: int) -> Value:
    """The engineering value a command metric carries for a metric of `datatype`."""
    if metric.is_null:
        raise CommandRefused("the value is null: nothing to write")
    sent = metric.datatype if metric.HasField("datatype") else pb.Unknown
    if sent not in (pb.Unknown, datatype):
        raise CommandRefused(f"datatype {_type_name(sent)}, but the metric is "
                             f"{_type_name(datatype)}")
    field = metric.WhichOneof("value")
    if field is None:
        raise CommandRefused("no value")
    fields, read = _READ[datatype]
    if field not in fields:
        raise CommandRefused(f"{_type_name(datatype)} values come in {fields[0]}, not {field}")
    raw = getattr(metric, field)
    if isinstance(raw, bytes):  # proto2 hands invalid UTF-8 back as bytes
        raise CommandRefused("the value is not UTF-8 text")
    value = read(raw)
    if value is None:
        raise CommandRefused(f"{clip(str(raw))} is not a valid {_type_name(datatype)} value")
    return value


def _name(metric: pb.Payload.Metric) -> str | None:
    if not metric.HasField("name"):
        return None
    name: object = metric.name  # proto2 hands invalid UTF-8 back as bytes
    if not isinstance(name, str):
        raise CommandRefused("the metric name is not UTF-8 text")
    return name


def _label(metric: pb.Payload.Metric) -> str:
    name: object = metric.name if metric.HasField("name") else None
    if isinstance(name, str):
        return clip(name)
    return f"alias {metric.alias}" if metric.HasField("alias") else "?"


def _type_name(number: int) -> str:
    try:
        return pb.DataType.Name(number)
    except ValueError:
        return str(number)


# --- wire value -> engineering value, per datatype (None: not a value of that datatype) --------


def _signed(bits: int) -> Callable[[object], Value | None]:
    def read(raw: object) -> int | None:
        if not isinstance(raw, int):
            return None
        if bits < 32 and (1 << 32) - (1 << (bits - 1)) <= raw < 1 << 32:
            return raw - (1 << 32)  # sign-extended to 32 bits
        if raw >= 1 << bits:
            return None
        return raw - (1 << bits) if raw >= 1 << (bits - 1) else raw

    return read


def _unsigned(bits: int) -> Callable[[object], Value | None]:
    def read(raw: object) -> int | None:
        return raw if isinstance(raw, int) and 0 <= raw < 1 << bits else None

    return read


def _finite(raw: object) -> float | None:
    return raw if isinstance(raw, float) and math.isfinite(raw) else None


def _float32(raw: object) -> float | None:
    number = _finite(raw)
    if number is None:
        return None
    short = shortest_float32(number)  # 0.1f reads back as 0.1
    # ... except at float32's largest values, whose shortest forms lie just past its maximum
    # (3.4028235e38), which the codec then refuses to write.
    return short if abs(short) <= _FLOAT32_MAX else number


def _boolean(raw: object) -> bool | None:
    return raw if isinstance(raw, bool) else None


def _text(raw: object) -> str | None:
    return raw if isinstance(raw, str) else None


_READ: Mapping[int, tuple[tuple[str, ...], Callable[[object], Value | None]]] = {
    pb.Int16: (("int_value",), _signed(16)),
    pb.Int32: (("int_value",), _signed(32)),
    pb.Int64: (("long_value",), _signed(64)),
    pb.UInt16: (("int_value",), _unsigned(16)),
    pb.UInt32: (("int_value", "long_value"), _unsigned(32)),
    pb.UInt64: (("long_value",), _unsigned(64)),
    pb.Float: (("float_value",), _float32),
    pb.Double: (("double_value",), _finite),
    pb.Boolean: (("boolean_value",), _boolean),
    pb.String: (("string_value",), _text),
}
