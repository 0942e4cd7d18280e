"""Home Assistant discovery documents: what HA is told about each device and point."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from bridge.config import Config, load_config
from bridge.core.homeassistant import UNIT_CLASSES, Discovery
from bridge.errors import ConfigError


def _config(tmp_path: Path, *, points: list[dict[str, Any]], **mqtt: Any) -> Config:
    doc = {
        "version": 1,
        "gateway": {"id": "gw-1", "state_dir": str(tmp_path / "state")},
        "mqtt": {"topic_prefix": "plant", "homeassistant": {}, **mqtt},
        "links": [{"name": "plc", "type": "tcp", "host": "127.0.0.1"}],
        "devices": [{"name": "meter", "link": "plc", "manufacturer": "Eastron",
                     "model": "SDM630", "points": points}],
    }
    path = tmp_path / "bridge.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    return load_config(path)


def _components(config: Config) -> dict[str, Any]:
    found: dict[str, Any] = Discovery(config, "1.2.3").device_document(config.devices[0])["cmps"]
    return found


def test_one_retained_document_per_device_and_one_for_the_gateway(tmp_path: Path) -> None:
    config = _config(tmp_path, points=[{"name": "v", "address": 0, "unit": "V"}])
    messages = Discovery(config, "1.2.3").messages(ts=5)
    assert [m.topic for m in messages] == [
        "homeassistant/device/gw-1/config", "homeassistant/device/gw-1_meter/config"]
    assert all(m.retain and m.qos == 1 for m in messages)
    gateway, meter = (json.loads(m.payload) for m in messages)
    status = gateway["cmps"]["status"]
    assert (status["p"], status["device_class"], status["state_topic"]) == (
        "binary_sensor", "connectivity", "plant/status")
    assert meter["dev"] == {"identifiers": ["gw-1_meter"], "name": "meter", "via_device": "gw-1",
                            "manufacturer": "Eastron", "model": "SDM630"}
    assert gateway["dev"]["identifiers"] == ["gw-1"]  # what via_device points at
    assert meter["o"] == {"name": "m2m-bridge", "sw_version": "1.2.3"}
    # Both must be online: a live device behind a dead gateway is not available.
    assert meter["availability"] == [{"topic": "plant/status"}, {"topic": "plant/meter/status"}]
    assert meter["availability_mode"] == "all"


def test_a_custom_prefix_and_the_clearing_document(tmp_path: Path) -> None:
    config = _config(tmp_path, points=[{"name": "v", "address": 0}],
                     homeassistant={"prefix": "ha"})
    discovery = Discovery(config, "1")
    assert discovery.status_topic == "ha/status"
    cleared = discovery.clear("meter", ts=1)
    assert (cleared.topic, cleared.payload, cleared.retain) == (
        "ha/device/gw-1_meter/config", b"", True)


@pytest.mark.parametrize(
    ("point", "platform"),
    [
        ({"type": "float32", "address": 0}, "sensor"),
        ({"type": "string", "count": 4, "address": 0}, "sensor"),
        ({"address": 0, "values": {0: "off", 1: "run"}}, "sensor"),
        ({"table": "discrete", "address": 0}, "binary_sensor"),
        ({"address": 0, "bit": 3}, "binary_sensor"),
        ({"table": "coil", "address": 0, "writable": True}, "switch"),
        ({"address": 0, "writable": True}, "number"),
        ({"address": 0, "writable": True, "values": {0: "off", 1: "run"}}, "select"),
        ({"type": "string", "count": 4, "address": 0, "writable": True}, "text"),
    ],
)
def test_the_platform_follows_the_point(
    tmp_path: Path, point: dict[str, Any], platform: str
) -> None:
    [component] = _components(_config(tmp_path, points=[{"name": "p", **point}])).values()
    assert component["p"] == platform
    assert component["unique_id"] == "gw_1_meter_p"
    assert component["default_entity_id"] == f"{platform}.gw_1_meter_p"
    assert ("command_topic" in component) == bool(point.get("writable"))
    if point.get("writable"):
        assert component["command_topic"] == "plant/meter/p/set"


@pytest.mark.parametrize(
    ("unit", "device_class", "state_class"),
    [("V", "voltage", "measurement"), ("A", "current", "measurement"),
     ("kW", "power", "measurement"), ("kWh", "energy", "total_increasing"),
     ("Wh", "energy", "total_increasing"), ("Hz", "frequency", "measurement"),
     ("°C", "temperature", "measurement"), ("%", None, "measurement")],
)
def test_classes_come_from_the_unit(
    tmp_path: Path, unit: str, device_class: str | None, state_class: str
) -> None:
    config = _config(tmp_path, points=[{"name": "p", "address": 0, "unit": unit}])
    component = _components(config)["p"]
    assert component.get("device_class") == device_class
    assert component["state_class"] == state_class
    assert component["unit_of_measurement"] == unit


def test_energy_is_never_a_measurement() -> None:
    """HA's long-term statistics sum `total_increasing` counters; a `measurement` kWh breaks
    the energy dashboard."""
    energy = [cls for cls in UNIT_CLASSES.values() if cls[0] == "energy"]
    assert energy
    assert all(state == "total_increasing" for _, state in energy)


def test_ha_block_overrides_the_unit(tmp_path: Path) -> None:
    config = _config(tmp_path, points=[
        {"name": "level", "address": 0, "unit": "%",
         "ha": {"device_class": "battery", "icon": "mdi:battery"}},
        {"name": "import", "address": 1, "unit": "kWh", "ha": {"state_class": "total"}},
        {"name": "door", "table": "discrete", "address": 0, "ha": {"device_class": "door"}},
    ])
    components = _components(config)
    assert (components["level"]["device_class"], components["level"]["icon"]) == (
        "battery", "mdi:battery")
    assert components["level"]["state_class"] == "measurement"
    assert (components["import"]["device_class"], components["import"]["state_class"]) == (
        "energy", "total")
    assert components["door"]["device_class"] == "door"


def test_state_topics_and_templates_follow_the_message_format(tmp_path: Path) -> None:
    point = [{"name": "line-v", "address": 0}, {"name": "run", "table": "coil", "address": 0}]
    json_point = _components(_config(tmp_path, points=point))
    assert json_point["line-v"]["state_topic"] == "plant/meter/line-v"
    assert json_point["line-v"]["value_template"] == "{{ value_json.value }}"
    assert json_point["run"]["value_template"] == "{{ 'ON' if value_json.value else 'OFF' }}"
    bare = _components(_config(tmp_path, points=point, format="value"))
    assert bare["line-v"]["value_template"] == "{{ value_json }}"
    device = _components(_config(tmp_path, points=point, messages="per-device"))
    assert device["line-v"]["state_topic"] == "plant/meter"
    assert device["line-v"]["value_template"] == "{{ value_json['values'][\"line-v\"] }}"


def test_a_writable_number_gets_its_limits_or_its_types_range(tmp_path: Path) -> None:
    config = _config(tmp_path, points=[
        {"name": "sp", "address": 0, "writable": True, "min": 5, "max": 80, "unit": "°C"},
        {"name": "raw", "address": 1, "type": "int16", "writable": True},
        {"name": "scaled", "address": 2, "writable": True, "scale": 0.1},
    ])
    components = _components(config)
    assert {k: components["sp"][k] for k in ("min", "max", "step")} == {
        "min": 5, "max": 80, "step": 1}
    assert components["sp"]["device_class"] == "temperature"
    assert "state_class" not in components["sp"]  # number entities have none
    assert (components["raw"]["min"], components["raw"]["max"]) == (-32768, 32767)
    assert components["scaled"]["max"] == pytest.approx(6553.5)
    assert components["scaled"]["step"] == pytest.approx(0.1)


def test_switch_and_select_send_what_a_set_command_accepts(tmp_path: Path) -> None:
    config = _config(tmp_path, points=[
        {"name": "pump", "table": "coil", "address": 0, "writable": True},
        {"name": "mode", "address": 0, "writable": True, "values": {0: "auto", 1: "manual"}},
    ])
    components = _components(config)
    assert (components["pump"]["payload_on"], components["pump"]["payload_off"]) == (
        "true", "false")
    assert components["mode"]["options"] == ["auto", "manual"]


def test_bad_homeassistant_settings_are_located_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        _config(tmp_path, points=[{"name": "p", "address": 0,
                                   "ha": {"state_class": "sum", "icon": "flash"}}],
                homeassistant={"prefix": "home/assistant"})
    text = str(caught.value)
    assert "mqtt.homeassistant.prefix: 'home/assistant' must be one topic level" in text
    assert "devices[0].points[0].ha.state_class:" in text
    assert "devices[0].points[0].ha.icon: 'flash' is not an icon name" in text
