"""Home Assistant MQTT discovery documents from the config (DESIGN.md "Northbound standards"). Pure.

One retained device-based document per device on `<ha prefix>/device/<gateway>_<device>/config`
(`dev`, `o`, `cmps`: one component per point), and one for the gateway, whose `connectivity`
binary sensor on `<prefix>/status` is what each device's `via_device` points at. Entities are
available only while both the gateway and their device say `online` (retained statuses).

A point's platform follows what it is: numbers, strings and read-only enums are `sensor`s,
read-only bools `binary_sensor`s, writable bools `switch`es, writable numbers `number`s,
writable enums `select`s and writable strings `text`s. `device_class`/`state_class` come from
the unit (UNIT_CLASSES), overridden per point by `ha:`; an energy counter is
`total_increasing`, never `measurement`, because HA's statistics treat the two differently.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bridge.core.codec import INT_RANGES
from bridge.core.messages import Message, Topics
from bridge.registers import BIT_TABLES

if TYPE_CHECKING:
    from bridge.config import Config, Device, Point

# unit -> (device_class, state_class). Only units that name one quantity: `%` (humidity?
# battery? valve position?) or `m³` (a tank or a meter?) get no class but `measurement`,
# and a `ha:` block says the rest.
UNIT_CLASSES: dict[str, tuple[str | None, str]] = {
    "V": ("voltage", "measurement"),
    "mV": ("voltage", "measurement"),
    "kV": ("voltage", "measurement"),
    "A": ("current", "measurement"),
    "mA": ("current", "measurement"),
    "W": ("power", "measurement"),
    "kW": ("power", "measurement"),
    "MW": ("power", "measurement"),
    "VA": ("apparent_power", "measurement"),
    "kVA": ("apparent_power", "measurement"),
    "var": ("reactive_power", "measurement"),
    "kvar": ("reactive_power", "measurement"),
    "Wh": ("energy", "total_increasing"),
    "kWh": ("energy", "total_increasing"),
    "MWh": ("energy", "total_increasing"),
    "Hz": ("frequency", "measurement"),
    "°C": ("temperature", "measurement"),
    "°F": ("temperature", "measurement"),
    "K": ("temperature", "measurement"),
    "Pa": ("pressure", "measurement"),
    "hPa": ("pressure", "measurement"),
    "kPa": ("pressure", "measurement"),
    "mbar": ("pressure", "measurement"),
    "bar": ("pressure", "measurement"),
    "psi": ("pressure", "measurement"),
    "m³/h": ("volume_flow_rate", "measurement"),
    "L/min": ("volume_flow_rate", "measurement"),
    "s": ("duration", "measurement"),
    "min": ("duration", "measurement"),
    "h": ("duration", "measurement"),
}

_SLUG = re.compile(r"[^a-z0-9]+")


def slug(*parts: str) -> str:
    """An entity-id-safe name: lower case, runs of anything else become one `_`."""
    return _SLUG.sub("_", "_".join(parts).lower()).strip("_")


@dataclass(frozen=True, slots=True)
class Discovery:
    """What discovery publishes for one config; `clear(device)` when a reload removes one."""

    config: Config
    version: str

    @property
    def _prefix(self) -> str:
        settings = self.config.mqtt.homeassistant
        return settings.prefix if settings is not None else "homeassistant"

    @property
    def status_topic(self) -> str:
        """Where Home Assistant announces `online`: every document goes out again then."""
        return f"{self._prefix}/status"

    def topic(self, device: str | None) -> str:
        gateway = self.config.gateway.id
        node = gateway if device is None else f"{gateway}_{device}"
        return f"{self._prefix}/device/{node}/config"

    def messages(self, ts: int) -> list[Message]:
        """The gateway's document, then one per device: retained, QoS 1."""
        found = [self._message(self.topic(None), self.gateway_document(), ts)]
        found += [
            self._message(self.topic(d.name), self.device_document(d), ts)
            for d in self.config.devices
        ]
        return found

    def clear(self, device: str, ts: int) -> Message:
        """An empty retained document: Home Assistant removes the device and its entities."""
        return Message(self.topic(device), b"", 1, True, ts)

    @staticmethod
    def _message(topic: str, document: dict[str, Any], ts: int) -> Message:
        payload = json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()
        return Message(topic, payload, 1, True, ts)

    def _origin(self) -> dict[str, str]:
        return {"name": "m2m-bridge", "sw_version": self.version}

    def gateway_document(self) -> dict[str, Any]:
        gateway = self.config.gateway.id
        topics = Topics(self.config.mqtt.topic_prefix)
        return {
            "dev": {"identifiers": [gateway], "name": gateway, "manufacturer": "m2m-bridge",
                    "model": "Modbus to MQTT gateway", "sw_version": self.version},
            "o": self._origin(),
            "cmps": {
                "status": {
                    "p": "binary_sensor",
                    "device_class": "connectivity",
                    "name": "Status",
                    "unique_id": f"{slug(gateway)}_status",
                    "default_entity_id": f"binary_sensor.{slug(gateway, 'status')}",
                    "state_topic": topics.gateway_status,
                    "payload_on": "online",
                    "payload_off": "offline",
                },
            },
        }

    def device_document(self, device: Device) -> dict[str, Any]:
        gateway = self.config.gateway.id
        topics = Topics(self.config.mqtt.topic_prefix)
        dev: dict[str, Any] = {"identifiers": [f"{gateway}_{device.name}"],
                               "name": device.name, "via_device": gateway}
        if device.manufacturer:
            dev["manufacturer"] = device.manufacturer
        if device.model:
            dev["model"] = device.model
        availability = [{"topic": topics.gateway_status},
                        {"topic": topics.device_status(device.name)}]
        return {
            "dev": dev,
            "o": self._origin(),
            "availability": availability,
            "availability_mode": "all",
            "cmps": {point.name: self.component(device, point) for point in device.points},
        }

    def component(self, device: Device, point: Point) -> dict[str, Any]:
        """One point's entity: platform, ids, where its state and commands go, its classes."""
        mqtt = self.config.mqtt
        topics = Topics(mqtt.topic_prefix)
        platform = _platform(point)
        entity = slug(self.config.gateway.id, device.name, point.name)
        found: dict[str, Any] = {
            "p": platform,
            "name": point.name,
            "unique_id": entity,
            "default_entity_id": f"{platform}.{entity}",
        }
        if mqtt.messages == "per-device":
            found["state_topic"] = topics.device(device.name)
            # value_json.values.<point> in Jinja is the dict's values() method, and a '-' in
            # a point name would be a minus: subscripts say the same thing safely.
            value = f"value_json['values'][{json.dumps(point.name)}]"
        else:
            found["state_topic"] = topics.point(device.name, point.name)
            value = "value_json" if mqtt.format == "value" else "value_json.value"
        if platform in ("binary_sensor", "switch"):
            # Our payloads carry JSON true/false; HA compares state text with ON/OFF.
            found["value_template"] = f"{{{{ 'ON' if {value} else 'OFF' }}}}"
        else:
            found["value_template"] = f"{{{{ {value} }}}}"
        if point.writable:
            found["command_topic"] = topics.command(device.name, point.name)
        if platform == "switch":
            found |= {"payload_on": "true", "payload_off": "false",
                      "state_on": "ON", "state_off": "OFF"}
        elif platform == "number":
            found |= _number_range(point)
        elif platform == "select" or (platform == "sensor" and point.values is not None):
            found["options"] = list((point.values or {}).values())
            if platform == "sensor":
                found["device_class"] = "enum"
        if platform in ("sensor", "number") and point.values is None and point.type != "string":
            found |= _classes(point)
        elif point.ha is not None and point.ha.device_class is not None:
            found["device_class"] = point.ha.device_class
        if point.ha is not None and point.ha.icon is not None:
            found["icon"] = point.ha.icon
        return found


def _is_bool(point: Point) -> bool:
    return point.table in BIT_TABLES or point.type == "bool" or point.bit is not None


def _platform(point: Point) -> str:
    if _is_bool(point):
        return "switch" if point.writable else "binary_sensor"
    if not point.writable:
        return "sensor"
    if point.values is not None:
        return "select"
    return "text" if point.type == "string" else "number"


def _classes(point: Point) -> dict[str, Any]:
    """unit_of_measurement, device_class and state_class: the unit's, then the point's `ha:`."""
    found: dict[str, Any] = {}
    device_class, state_class = UNIT_CLASSES.get(point.unit or "", (None, "measurement"))
    if point.ha is not None:
        device_class = point.ha.device_class or device_class
        state_class = point.ha.state_class or state_class
    if point.unit:
        found["unit_of_measurement"] = point.unit
    if device_class is not None:
        found["device_class"] = device_class
    if point.writable:
        return found  # a number entity has no state_class
    found["state_class"] = state_class
    return found


def _number_range(point: Point) -> dict[str, Any]:
    """min/max/step of a writable number: the point's limits, else what its type can hold."""
    low, high = INT_RANGES.get(point.type, (-3.4e38, 3.4e38))
    ends = sorted((low * point.scale + point.offset, high * point.scale + point.offset))
    whole = point.type in INT_RANGES and float(point.scale).is_integer() and (
        float(point.offset).is_integer())
    if point.precision is not None:
        step: float = 10.0 ** -point.precision
    elif whole:
        step = 1
    else:
        step = min(abs(point.scale), 1.0) if point.type in INT_RANGES else 0.001
    return {
        "min": point.min if point.min is not None else _number(ends[0]),
        "max": point.max if point.max is not None else _number(ends[1]),
        "step": _number(step),
        "mode": "box",  # a slider across 0..65535 helps nobody
    }


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() and abs(value) < 2**63 else value
