"""The config file: its format (model: the whole file and the MQTT settings; devices: links,
devices and points; fields: durations, sizes, names), how it is read (loader), YAML with line
numbers (yamlsource) and secret references (secrets). Import what you need from here."""

from bridge.config.loader import load_config, state_dir_problem
from bridge.config.model import (
    BufferSettings,
    Config,
    Device,
    DeviceMap,
    Gateway,
    LineLink,
    Link,
    MetricsSettings,
    MqttSettings,
    Point,
    SerialLink,
    SimHint,
    TcpLink,
    Tls,
    config_json_schema,
    parse_duration,
    parse_size,
)

__all__ = [
    "BufferSettings",
    "Config",
    "Device",
    "DeviceMap",
    "Gateway",
    "LineLink",
    "Link",
    "MetricsSettings",
    "MqttSettings",
    "Point",
    "SerialLink",
    "SimHint",
    "TcpLink",
    "Tls",
    "config_json_schema",
    "load_config",
    "parse_duration",
    "parse_size",
    "state_dir_problem",
]
