"""The config file's format (version 1, DESIGN.md "Configuration") as pydantic models.

This module holds the whole file (`Config`), the gateway and the northbound settings (MQTT,
TLS, the buffer's bounds, metrics); the links, devices and points are in bridge.config.devices,
the strict value types (durations, sizes, names) in bridge.config.fields. Checks that one model
can make on its own live with it; what needs the whole file (links named, names unique, maps
merged) is in bridge.config.loader.
"""

from __future__ import annotations

import platform
import re
from typing import Any, Literal

from pydantic import (
    Field,
    PrivateAttr,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from bridge.config.devices import (
    Device,
    DeviceMap,
    HaHints,
    LineLink,
    Link,
    Point,
    SerialLink,
    SimHint,
    TcpLink,
)
from bridge.config.fields import (
    _NAME_CHARS,
    Duration,
    Name,
    Size,
    _Model,
)
from bridge.config.frozen import ConfigMethods
from bridge.errors import ConfigIssue
from bridge.units import parse_duration, parse_size

# The links, devices and points (bridge.config.devices) and the value types
# (bridge.config.fields) are part of the format too: importable from here as before.
__all__ = [
    "BufferSettings",
    "Config",
    "Device",
    "DeviceMap",
    "Duration",
    "Gateway",
    "HaHints",
    "HomeAssistant",
    "LineLink",
    "Link",
    "MetricsSettings",
    "MqttSettings",
    "Name",
    "Point",
    "SerialLink",
    "SimHint",
    "Size",
    "Sparkplug",
    "TcpLink",
    "Tls",
    "config_json_schema",
    "parse_duration",
    "parse_size",
]


class Gateway(_Model):
    """This gateway: its id (topic segment) and where durable state lives."""

    id: Name = Field(
        default_factory=lambda: re.sub(f"[^{_NAME_CHARS[1:]}", "-", platform.node()) or "gateway"
    )
    state_dir: str = Field(
        default="./state",
        description="default: $STATE_DIRECTORY, else ./state; relative to the config file",
    )

    @model_validator(mode="before")
    @classmethod
    def _state_dir_from_systemd(cls, data: Any, info: ValidationInfo) -> Any:
        environ = (info.context or {}).get("environ", {})
        if isinstance(data, dict) and "state_dir" not in data and "STATE_DIRECTORY" in environ:
            return {**data, "state_dir": environ["STATE_DIRECTORY"]}
        return data


class Tls(_Model):
    """TLS to the broker; verification is always on. `tls: {}` uses the system CAs."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


class BufferSettings(_Model):
    """Bounds of the on-disk buffer; the oldest readings are dropped first."""

    max_messages: int = Field(default=1_000_000, ge=1)
    max_bytes: Size = 256 * 2**20
    max_age: Duration = 7 * 86400.0
    # Backlog replay after an outage, messages a second: fast enough to catch up, slow enough
    # that a gateway back from a day offline does not flood a shared cloud broker.
    replay_rate: int = Field(default=1000, ge=1)


class MetricsSettings(_Model):
    """Prometheus text exposition; keep it on loopback unless a scraper must reach it."""

    host: str = "127.0.0.1"
    port: int = Field(default=9108, ge=1, le=65535)


class HomeAssistant(_Model):
    """Home Assistant MQTT discovery: retained device documents under `prefix`."""

    prefix: str = "homeassistant"  # Home Assistant's own default

    @field_validator("prefix")
    @classmethod
    def _one_topic_level(cls, value: str) -> str:
        if not value or any(c in value for c in "/+#\x00"):
            raise ValueError(f"{value!r} must be one topic level: no '/', '+' or '#'")
        return value


class Sparkplug(_Model):
    """Sparkplug B 3.0: the gateway as edge node `edge_node_id` in group `group_id`."""

    group_id: str
    edge_node_id: str = Field(default="", description="default: gateway.id")
    primary_host_id: str | None = Field(
        default=None, description="optional: publish births only while this host is online"
    )

    @field_validator("group_id", "edge_node_id", "primary_host_id")
    @classmethod
    def _sparkplug_id(cls, value: str | None) -> str | None:
        if value is not None and (not value or any(c in value for c in "/+#\x00")):
            raise ValueError(f"{value!r} is no Sparkplug id: empty, or has '/', '+' or '#'")
        return value


class MqttSettings(_Model):
    """The broker and how readings are published to it."""

    host: str = "localhost"
    port: int = Field(default=1883, ge=1, le=65535, description="default 1883, 8883 with tls")
    # Both defaults derive from gateway.id; Config fills them in before validation.
    client_id: str = Field(default="", description="default: m2m-bridge-<gateway.id>")
    username: str | None = None
    password: SecretStr | None = None
    tls: Tls | None = None
    # auto: MQTT 5, or 3.1.1 once a broker refuses 5 (CONNACK return code 1: NATS, RabbitMQ 3.x)
    protocol: Literal["auto", 5, "3.1.1"] = "auto"
    keepalive: Duration = 30.0
    topic_prefix: str = Field(default="", description="default: m2m/<gateway.id>")
    qos: Literal[0, 1] = 1
    retain: bool = False
    format: Literal["json", "value", "sparkplug"] = "json"
    messages: Literal["per-point", "per-device"] = "per-point"
    buffer: BufferSettings = Field(default_factory=BufferSettings)
    homeassistant: HomeAssistant | None = None  # off unless configured
    sparkplug: Sparkplug | None = None  # with format: sparkplug (bridge.config.loader checks)

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "port" not in data:
            data["port"] = 8883 if data.get("tls") is not None else 1883
        if data.get("protocol") == "5":  # a ${env:…} substitution is always a string
            data["protocol"] = 5
        return data


class Config(_Model, ConfigMethods):
    """The whole configuration file."""

    version: Literal[1]
    gateway: Gateway = Field(default_factory=Gateway)
    mqtt: MqttSettings = Field(default_factory=MqttSettings)
    links: list[Link] = []  # noqa: RUF012 - pydantic copies defaults
    devices: list[Device] = []  # noqa: RUF012 - pydantic copies defaults
    metrics: MetricsSettings | None = None  # off unless configured
    _source: str = PrivateAttr("")
    _warnings: list[ConfigIssue] = PrivateAttr(default_factory=list)
    _secrets: frozenset[str] = PrivateAttr(frozenset())

    @model_validator(mode="before")
    @classmethod
    def _defaults_from_gateway_id(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        gateway = data.get("gateway", {})
        mqtt = data.get("mqtt", {})
        if not isinstance(gateway, dict) or not isinstance(mqtt, dict):
            return data
        gateway_id = gateway.get("id", Gateway().id)
        mqtt = {"client_id": f"m2m-bridge-{gateway_id}", "topic_prefix": f"m2m/{gateway_id}"} | mqtt
        sparkplug = mqtt.get("sparkplug")
        if isinstance(sparkplug, dict) and "edge_node_id" not in sparkplug:
            mqtt["sparkplug"] = {**sparkplug, "edge_node_id": gateway_id}
        return {**data, "gateway": gateway, "mqtt": mqtt}


def config_json_schema() -> dict[str, Any]:
    """JSON Schema of the config file (what `m2m-bridge schema` prints for editors)."""
    return Config.model_json_schema()
