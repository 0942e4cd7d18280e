"""One device's readings -> MQTT messages: topics, payload format, `report: on-change`.

Pure: every kind of device loop (Modbus pollers, line instruments) and the write read-back
build their messages here, so the MQTT contract is built in one place.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import TYPE_CHECKING

from bridge.core.codec import Value
from bridge.core.messages import (
    Format,
    Message,
    PointPayload,
    Topics,
    device_payload,
    payload_of,
)
from bridge.core.normalize import ChangeFilter

if TYPE_CHECKING:
    from bridge.config import Device, MqttSettings
    from bridge.core.sparkplug import DeviceMetrics
    from bridge.core.sparkplug_stored import DeviceData


@functools.lru_cache(maxsize=256)
def _payloads(
    points: tuple[tuple[str, str | None], ...], fmt: Format
) -> Mapping[str, PointPayload]:
    """Point name -> payload encoder; one table for all the devices whose points have the same
    names and units (those of one map), never changed once made."""
    return {name: payload_of(unit, fmt) for name, unit in points}


class Outbox:
    """One device's readings -> MQTT messages: topics, payload format, `report: on-change`.

    Shared by every kind of poller (Modbus devices here, line instruments in bridge.instrument)
    so the MQTT contract is built in one place.
    """

    def __init__(self, device: Device, mqtt: MqttSettings) -> None:
        self._qos = mqtt.qos
        self._retain = mqtt.retain
        self._per_device = mqtt.messages == "per-device"
        self._heartbeat = device.heartbeat
        topics = Topics(mqtt.topic_prefix)
        self._device_topic = topics.device(device.name)
        fmt: Format = "value" if mqtt.format == "value" else "json"
        # Per-point messages: each point's payload encoder (in a table shared by the devices
        # of one map), its topic made per message from the device's part: a string kept per
        # point would be ~1.7 MiB at 500 devices x 30 points for a 40 ns concatenation saved.
        per_point = not self._per_device and mqtt.format != "sparkplug"
        self._payloads = (
            _payloads(tuple((p.name, p.unit) for p in device.points), fmt) if per_point else {})
        self._point_topic = topics.point(device.name, "")  # the point's name goes after
        self._deadbands = (
            {p.name: p.deadband for p in device.points} if device.report == "on-change" else {})
        # format: sparkplug: DDATA (without seq: bridge.core.sparkplug_stored) instead of JSON.
        # Imported only then: protobuf is ~2.3 MiB of RSS a JSON daemon need not hold.
        self._sparkplug: DeviceData | None = None
        if mqtt.format == "sparkplug" and mqtt.sparkplug:
            from bridge.core.sparkplug_stored import DeviceData  # noqa: PLC0415 - see above

            self._sparkplug = DeviceData(device, mqtt.sparkplug)
        self._changes = ChangeFilter() if device.report == "on-change" else None

    def messages(self, values: dict[str, Value], ts: int, now: float) -> list[Message]:
        """The messages for one poll's `values` (acquired at `ts` ms, monotonic `now`)."""
        if self._sparkplug is not None:
            self._sparkplug.remember(values, ts)
        if self._changes is not None:
            changes = self._changes
            values = {
                name: v
                for name, v in values.items()
                if changes.passes(name, v, now, self._deadbands[name], self._heartbeat)
            }
        return self.build(values, ts)

    def build(self, values: dict[str, Value], ts: int) -> list[Message]:
        """The messages for `values` as they are, no change filter (a write's read-back)."""
        if not values:
            return []
        if self._sparkplug is not None:
            return self._sparkplug.messages(values, ts)
        if self._per_device:
            payload = device_payload(values, ts)
            return [Message(self._device_topic, payload, self._qos, self._retain, ts)]
        payloads, topic = self._payloads, self._point_topic
        stamp = str(ts).encode()
        qos, retain = self._qos, self._retain
        return [
            Message(topic + n, payloads[n].build(v, stamp), qos, retain, ts)
            for n, v in values.items()
        ]

    def readback(self, values: dict[str, Value], ts: int, now: float) -> list[Message]:
        """A write's read-back: published whatever `report` says, and, with `on-change`, the
        value the next poll is compared with (else that poll would publish it a second time)."""
        if self._changes is not None:
            for name, value in values.items():
                # forget + passes records `value` as the last published, with `now` as its time
                self._changes.forget(name)
                self._changes.passes(name, value, now, None, None)
        if self._sparkplug is not None:
            self._sparkplug.remember(values, ts)
        return self.build(values, ts)

    @property
    def sparkplug(self) -> DeviceData | None:
        """With `format: sparkplug`: the device's DDATA encoding and last values."""
        return self._sparkplug

    def use_metrics(self, metrics: DeviceMetrics | None) -> None:
        """With `format: sparkplug`: the aliases to encode with (the edge node's, which
        depend on the whole config: the service hands them out)."""
        if self._sparkplug is not None:
            self._sparkplug.metrics = metrics

    def forget(self) -> None:
        """After the device was offline, publish every point's next reading whatever it is."""
        if self._changes is not None:
            for name in self._deadbands:
                self._changes.forget(name)
