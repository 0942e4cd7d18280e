"""Reload by difference, unit-tested: Service.reload and the daemon's reload, no process.

A Service is built from a config (its links are clients that have not connected, its
publisher has not run), then `reload` is given a changed config. What a user sees in the log
is the list of changes; what they see on the bus is which devices kept polling, which
restarted, which went `offline`, and which commands are now accepted.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml

from bridge.config import Config, load_config
from bridge.config.apart import freeze
from bridge.daemon import reload as daemon_reload
from bridge.mqtt.wireevents import Incoming
from bridge.service import Service


def _doc(tmp_path: Path) -> dict[str, Any]:
    return {
        "version": 1,
        "gateway": {"id": "gw", "state_dir": str(tmp_path / "state")},
        "mqtt": {"host": "127.0.0.1", "port": 1, "topic_prefix": "plant"},
        "links": [
            {"name": "plc", "type": "tcp", "host": "127.0.0.1", "port": 1, "timeout": "300ms"},
            {"name": "rtu", "type": "tcp", "host": "127.0.0.1", "port": 2, "timeout": "300ms"},
        ],
        "devices": [
            {"name": "a", "link": "plc", "unit": 1, "interval": "1s",
             "points": [{"name": "v", "address": 0}]},
            {"name": "b", "link": "plc", "unit": 2, "interval": "1s",
             "points": [{"name": "v", "address": 0}]},
            {"name": "c", "link": "rtu", "unit": 1, "interval": "1s",
             "points": [{"name": "v", "address": 0}]},
        ],
    }


def _config(tmp_path: Path, doc: dict[str, Any], name: str = "bridge.yaml") -> Config:
    """The config as the daemon holds it (frozen, as its loader child sends it)."""
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    return freeze(load_config(path))


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    built = Service(_config(tmp_path, _doc(tmp_path)))
    yield built
    for link in built.links.values():
        link.close()
    built.buffer.close()


def _statuses(service: Service) -> dict[str, bool]:
    return dict(service.publisher.statuses.current)


def _device(doc: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(d for d in doc["devices"] if d["name"] == name)
    return found


def test_a_changed_device_restarts_alone(service: Service, tmp_path: Path) -> None:
    before = dict(service.pollers)
    links = dict(service.links)
    doc = _doc(tmp_path)
    _device(doc, "b")["interval"] = "2s"
    changes = service.reload(_config(tmp_path, doc))
    assert changes == ["device b restarted"]
    assert service.pollers["a"] is before["a"]
    assert service.pollers["c"] is before["c"]
    assert service.pollers["b"] is not before["b"]
    assert service.links == links  # the same clients: no reconnect for anyone


def test_a_changed_link_restarts_its_devices_and_only_them(
    service: Service, tmp_path: Path
) -> None:
    before = dict(service.pollers)
    plc, rtu = service.links["plc"], service.links["rtu"]
    doc = _doc(tmp_path)
    doc["links"][0]["timeout"] = "500ms"
    changes = service.reload(_config(tmp_path, doc))
    assert sorted(changes) == ["device a restarted", "device b restarted", "link plc restarted"]
    assert service.links["plc"] is not plc
    assert service.links["rtu"] is rtu
    assert service.pollers["c"] is before["c"]
    assert service.pollers["a"] is not before["a"]


def test_a_removed_device_stops_and_is_told_offline(service: Service, tmp_path: Path) -> None:
    service.publisher.set_status("c", True)
    doc = _doc(tmp_path)
    doc["devices"] = [d for d in doc["devices"] if d["name"] != "c"]
    doc["links"] = [link for link in doc["links"] if link["name"] != "rtu"]
    changes = service.reload(_config(tmp_path, doc))
    assert sorted(changes) == ["device c removed", "link rtu removed"]
    assert "c" not in service.pollers
    assert "rtu" not in service.links
    assert _statuses(service)["c"] is False


def test_an_added_device_starts(service: Service, tmp_path: Path) -> None:
    doc = _doc(tmp_path)
    doc["devices"].append({"name": "d", "link": "rtu", "unit": 5, "interval": "1s",
                           "points": [{"name": "v", "address": 3}]})
    assert service.reload(_config(tmp_path, doc)) == ["device d added"]
    assert "d" in service.pollers


def test_an_mqtt_change_restarts_the_publisher_keeping_statuses(
    service: Service, tmp_path: Path
) -> None:
    old = service.publisher
    old.set_status("a", True)
    old.set_status("b", False)
    pollers = dict(service.pollers)
    doc = _doc(tmp_path)
    doc["mqtt"]["port"] = 2
    changes = service.reload(_config(tmp_path, doc))
    assert changes == ["mqtt publisher restarted"]
    assert service.publisher is not old
    assert _statuses(service) == {"a": True, "b": False}
    assert service.pollers == pollers  # no device restarts for a broker change


def test_a_state_dir_change_waits_for_a_restart(service: Service, tmp_path: Path) -> None:
    doc = _doc(tmp_path)
    doc["gateway"]["state_dir"] = str(tmp_path / "elsewhere")
    changes = service.reload(_config(tmp_path, doc))
    assert "gateway.state_dir changed: takes effect at the next start" in changes
    assert Path(service.buffer.path).parent == tmp_path / "state"


async def test_a_point_made_writable_takes_commands_at_once(
    service: Service, tmp_path: Path
) -> None:
    """The command handler is swapped on reload, with no publisher restart: a `/set` that
    was refused as read-only is accepted (it reaches the link) after the reload."""
    replies: list[bytes] = []

    async def respond(topic: str, payload: bytes, correlation_data: bytes | None = None) -> bool:
        replies.append(payload)
        return True

    def command() -> None:
        service.publisher.on_message(  # type: ignore[misc]
            Incoming("plant/a/v/set", b"7", None, None)
        )

    service.publisher.respond = respond  # type: ignore[method-assign]
    command()
    await service.commands.drain(5.0)
    assert b"read-only" in replies[-1]
    doc = copy.deepcopy(_doc(tmp_path))
    _device(doc, "a")["points"][0]["writable"] = True
    service.reload(_config(tmp_path, doc))
    command()
    await service.commands.drain(5.0)
    # Accepted now: it went to the device, which (nothing listens on port 1) is not there.
    answer = json.loads(replies[-1])
    assert answer["ok"] is False
    assert "read-only" not in answer["error"]
    assert "127.0.0.1:1" in answer["error"]


@pytest.mark.integration  # the reload reads the file in a child process
async def test_a_broken_file_keeps_the_running_config(
    service: Service, tmp_path: Path
) -> None:
    path = tmp_path / "bridge.yaml"
    running = service.config
    pollers = dict(service.pollers)
    path.write_text("devices: [unclosed\n")
    with structlog.testing.capture_logs() as logs:
        await daemon_reload(path, service)
    assert service.config is running
    assert service.pollers == pollers
    refused = [e for e in logs if e["event"].startswith("reload refused")]
    assert refused, logs
    assert any("bridge.yaml" in str(e.get("issue", "")) for e in logs)


@pytest.mark.integration  # the reload reads the file in a child process
async def test_a_good_file_is_applied_and_its_changes_logged(
    service: Service, tmp_path: Path
) -> None:
    doc = _doc(tmp_path)
    _device(doc, "a")["interval"] = "3s"
    (tmp_path / "bridge.yaml").write_text(yaml.safe_dump(doc))
    with structlog.testing.capture_logs() as logs:
        await daemon_reload(tmp_path / "bridge.yaml", service)
    assert [e["changes"] for e in logs if e["event"] == "reloaded"] == [["device a restarted"]]
    assert service.config.devices[0].interval == 3.0
