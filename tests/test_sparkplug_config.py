"""`mqtt.format: sparkplug` and `mqtt.sparkplug` in the config: defaults and located errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.config import Config, load_config
from bridge.errors import ConfigError, ConfigIssue

HEAD = "version: 1\ngateway: {id: gw-01, state_dir: state}\n"


def _load(tmp_path: Path, mqtt: str) -> Config:
    path = tmp_path / "bridge.yaml"
    path.write_text(HEAD + mqtt)
    return load_config(path, environ={})


def _issues(tmp_path: Path, mqtt: str) -> list[tuple[str, int, str]]:
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, mqtt)
    found: list[ConfigIssue] = caught.value.issues
    return [(i.path, i.line, i.message) for i in found]


def test_defaults_edge_node_id_to_the_gateway_id(tmp_path: Path) -> None:
    config = _load(tmp_path, "mqtt:\n  format: sparkplug\n  sparkplug: {group_id: plant-1}\n")
    assert config.mqtt.format == "sparkplug"
    assert config.mqtt.sparkplug is not None
    assert config.mqtt.sparkplug.group_id == "plant-1"
    assert config.mqtt.sparkplug.edge_node_id == "gw-01"
    assert config.mqtt.sparkplug.primary_host_id is None


def test_every_setting(tmp_path: Path) -> None:
    config = _load(tmp_path, "mqtt:\n  format: sparkplug\n  sparkplug:\n    group_id: g\n"
                             "    edge_node_id: node-7\n    primary_host_id: scada\n")
    assert config.mqtt.sparkplug is not None
    assert (config.mqtt.sparkplug.edge_node_id, config.mqtt.sparkplug.primary_host_id) == (
        "node-7", "scada")


def test_a_sparkplug_block_without_format_sparkplug(tmp_path: Path) -> None:
    [(path, line, message)] = _issues(tmp_path, "mqtt:\n  sparkplug: {group_id: g}\n")
    assert (path, line) == ("mqtt.sparkplug", 4)
    assert "only with mqtt.format: sparkplug" in message


def test_format_sparkplug_without_a_block(tmp_path: Path) -> None:
    [(path, line, message)] = _issues(tmp_path, "mqtt:\n  format: sparkplug\n")
    assert (path, line) == ("mqtt.format", 4)
    assert "mqtt.sparkplug.group_id" in message


def test_format_sparkplug_without_group_id(tmp_path: Path) -> None:
    [(path, line, _)] = _issues(
        tmp_path, "mqtt:\n  format: sparkplug\n  sparkplug: {edge_node_id: n}\n")
    assert (path, line) == ("mqtt.sparkplug.group_id", 5)


@pytest.mark.parametrize("key", ["group_id", "edge_node_id", "primary_host_id"])
@pytest.mark.parametrize("bad", ["a/b", "a+", "#", ""])
def test_ids_with_topic_characters(tmp_path: Path, key: str, bad: str) -> None:
    block = {"group_id": "g", key: bad}
    text = ", ".join(f"{k}: {v!r}" for k, v in block.items())
    [(path, line, message)] = _issues(
        tmp_path, f"mqtt:\n  format: sparkplug\n  sparkplug: {{{text}}}\n")
    assert (path, line) == (f"mqtt.sparkplug.{key}", 5)
    assert "no Sparkplug id" in message


def test_homeassistant_with_sparkplug(tmp_path: Path) -> None:
    [(path, line, message)] = _issues(
        tmp_path,
        "mqtt:\n  format: sparkplug\n  sparkplug: {group_id: g}\n  homeassistant: {}\n")
    assert (path, line) == ("mqtt.homeassistant", 6)
    assert "sparkplug" in message
