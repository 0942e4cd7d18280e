"""The config file: its format (model: the whole file and the MQTT settings; devices: links,
devices and points; fields: durations, sizes, names), how it is read (loader), YAML with line
numbers (yamlsource) and secret references (secrets). Import what you need from here.

Names are imported from their module when first used: the daemon gets its config from a child
process (bridge.config.apart) as frozen objects (bridge.config.frozen), so it loads neither
pydantic's models nor the loader with YAML, the map library and secret references behind it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bridge.config.library import SUNSPEC, library_names, library_path, unknown_map
    from bridge.config.loader import load_config, load_library_map, state_dir_problem, with_map
    from bridge.config.model import (
        BufferSettings,
        Config,
        Device,
        DeviceMap,
        Gateway,
        HaHints,
        HomeAssistant,
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
    "SUNSPEC",
    "BufferSettings",
    "Config",
    "Device",
    "DeviceMap",
    "Gateway",
    "HaHints",
    "HomeAssistant",
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
    "library_names",
    "library_path",
    "load_config",
    "load_library_map",
    "parse_duration",
    "parse_size",
    "state_dir_problem",
    "unknown_map",
    "with_map",
]

_LIBRARY = frozenset({"SUNSPEC", "library_names", "library_path", "unknown_map"})
_LOADER = frozenset({"load_config", "load_library_map", "state_dir_problem", "with_map"})

if not TYPE_CHECKING:  # mypy sees the imports above, so it still flags a name that is not here

    def __getattr__(name: str) -> Any:
        if name not in __all__:
            raise AttributeError(f"module 'bridge.config' has no attribute {name!r}")
        home = "library" if name in _LIBRARY else "loader" if name in _LOADER else "model"
        # Not kept in this module's globals: a test patching the loader sees its patch undone.
        return getattr(importlib.import_module(f"bridge.config.{home}"), name)

    def __dir__() -> list[str]:
        return sorted(__all__)
