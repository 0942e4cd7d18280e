"""End to end: `m2m-bridge run` as a subprocess, a pymodbus device, a real mosquitto."""

from __future__ import annotations

import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from bridge.sim.tcp import Simulator
from tests.helpers import Broker, Daemons, free_port, metrics, recording, simulated, until

pytestmark = pytest.mark.integration  # starts processes or socket servers

PREFIX = "m2m/e2e"
NUMERIC = {
    "int16": -12345,
    "uint16": 54321,
    "int32": -123456789,
    "uint32": 3123456789,
    "int64": -(2**40) - 5,
    "uint64": 2**63 + 11,
    "float32": 230.5,
    "float64": -1234.56789,
}
ORDERS = ("ABCD", "CDAB", "BADC", "DCBA")


def every_type_points() -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Points of every type in every byte order, each at its own address, with expectations."""
    points: list[dict[str, Any]] = []
    expected: dict[str, Any] = {}
    address = 0
    for type_, value in NUMERIC.items():
        for order in ORDERS:
            name = f"{type_}_{order.lower()}"
            points.append({"name": name, "address": address, "type": type_, "byte_order": order})
            expected[name] = value
            address += 4
    points += [
        {"name": "serial", "address": 200, "type": "string", "count": 4},
        {"name": "status_word", "address": 210},
        {"name": "running", "address": 210, "type": "bool", "bit": 0},
        {"name": "tripped", "address": 210, "type": "bool", "bit": 3},
        {"name": "state", "address": 211, "values": {0: "stopped", 1: "running", 2: "fault"}},
        {"name": "temp", "address": 212, "type": "int16", "scale": 0.1, "precision": 1,
         "unit": "°C"},
        {"name": "voltage", "table": "input", "address": 0, "type": "float32", "unit": "V"},
        {"name": "pump_on", "table": "coil", "address": 3},
        {"name": "door", "table": "discrete", "address": 7},
    ]
    expected |= {
        "serial": "SN-42",
        "status_word": 0b1001,
        "running": True,
        "tripped": True,
        "state": "fault",
        "temp": -12.5,
        "voltage": 229.75,
        "pump_on": True,
        "door": True,
    }
    return points, expected


def write_config(
    path: Path, broker: int, device_port: int, points: list[dict[str, Any]], **overrides: Any
) -> Path:
    device = {"name": "dev", "link": "plc", "unit": 1, "interval": "200ms", "points": points}
    device |= overrides.pop("device", {})
    doc = {
        "version": 1,
        "gateway": {"id": "e2e", "state_dir": str(path.parent / "state")},
        "mqtt": {"host": "127.0.0.1", "port": broker, "qos": 1} | overrides.pop("mqtt", {}),
        # The simulator answers from the test's own event loop, which a loaded machine can hold
        # up for a moment: a write is never retried, so a tight timeout would fail it.
        "links": [{"name": "plc", "type": "tcp", "host": "127.0.0.1", "port": device_port,
                   "timeout": "2s"}],
        "devices": [device, *overrides.pop("extra_devices", [])],
    }
    doc["links"] += overrides.pop("extra_links", [])
    if "metrics" in overrides:
        doc["metrics"] = overrides.pop("metrics")
    path.write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
    return path


@pytest.fixture
async def device(tmp_path: Path) -> AsyncIterator[tuple[Simulator, int, dict[str, Any]]]:
    """A pymodbus slave serving every_type_points() with the expected values set."""
    port = free_port()
    points, expected = every_type_points()
    cfg = write_config(tmp_path / "device.yaml", 1883, port, points)
    async with simulated(cfg, {"dev": expected}) as sim:
        yield sim, port, expected


async def test_every_type_and_byte_order_arrives_and_sigterm_publishes_offline(
    tmp_path: Path, broker: Broker, device: tuple[Simulator, int, dict[str, Any]],
    daemons: Daemons,
) -> None:
    """Each point's value, ts and unit arrive on its topic; SIGTERM leaves `offline`, exit 0."""
    _, port, expected = device
    points, _ = every_type_points()
    config = write_config(tmp_path / "bridge.yaml", broker.port, port, points)
    async with recording(broker.port, f"{PREFIX}/#") as rec:
        d = daemons.start(config)
        await rec.wait_for(lambda: all(rec.payloads(f"{PREFIX}/dev/{n}") for n in expected))
        for name, value in expected.items():
            body = json.loads(rec.payloads(f"{PREFIX}/dev/{name}")[-1])
            assert body["value"] == value, name
            assert isinstance(body["ts"], int)
            assert body["ts"] > 1_700_000_000_000
        assert json.loads(rec.payloads(f"{PREFIX}/dev/temp")[-1])["unit"] == "°C"
        assert "unit" not in json.loads(rec.payloads(f"{PREFIX}/dev/state")[-1])
        assert rec.last(f"{PREFIX}/status") == b"online"
        assert rec.last(f"{PREFIX}/dev/status") == b"online"

        d.signal(signal.SIGTERM)
        assert d.wait() == 0, d.output()
        await rec.wait_for(lambda: rec.last(f"{PREFIX}/status") == b"offline")
    assert "Traceback" not in d.output()


async def test_per_device_messages_and_value_format(
    tmp_path: Path, broker: Broker, device: tuple[Simulator, int, dict[str, Any]],
    daemons: Daemons,
) -> None:
    """messages: per-device sends one {"ts", "values"} per poll with every point."""
    _, port, expected = device
    points, _ = every_type_points()
    config = write_config(tmp_path / "bridge.yaml", broker.port, port, points,
                          mqtt={"messages": "per-device"})
    async with recording(broker.port, f"{PREFIX}/#") as rec:
        daemons.start(config)
        await rec.wait_for(lambda: len(rec.payloads(f"{PREFIX}/dev")) >= 2)
    bodies = [json.loads(p) for p in rec.payloads(f"{PREFIX}/dev")]
    merged: dict[str, Any] = {}
    for body in bodies:
        merged |= body["values"]
    assert merged == expected
    assert not rec.payloads(f"{PREFIX}/dev/voltage")


async def test_value_format_publishes_bare_values(
    tmp_path: Path, broker: Broker, device: tuple[Simulator, int, dict[str, Any]],
    daemons: Daemons,
) -> None:
    """format: value publishes just the JSON value."""
    _, port, _ = device
    points = [{"name": "voltage", "table": "input", "address": 0, "type": "float32"},
              {"name": "state", "address": 211, "values": {2: "fault"}}]
    config = write_config(tmp_path / "bridge.yaml", broker.port, port, points,
                          mqtt={"format": "value"})
    async with recording(broker.port, f"{PREFIX}/#") as rec:
        daemons.start(config)
        await rec.wait_for(lambda: rec.payloads(f"{PREFIX}/dev/state"))
        assert rec.payloads(f"{PREFIX}/dev/voltage")[-1] == b"229.75"
        assert rec.payloads(f"{PREFIX}/dev/state")[-1] == b'"fault"'


async def test_on_change_respects_deadband(
    tmp_path: Path, broker: Broker, device: tuple[Simulator, int, dict[str, Any]],
    daemons: Daemons,
) -> None:
    """report: on-change publishes the first value, skips changes under the deadband."""
    sim, port, _ = device
    points = [{"name": "voltage", "table": "input", "address": 0, "type": "float32",
               "deadband": 1.0}]
    metrics_port = free_port()
    config = write_config(tmp_path / "bridge.yaml", broker.port, port, points,
                          device={"report": "on-change", "heartbeat": "1h"},
                          metrics={"host": "127.0.0.1", "port": metrics_port})
    topic = f"{PREFIX}/dev/voltage"

    async def polls() -> float:
        return (await metrics(metrics_port)).get('m2m_polls_total{device="dev",link="plc"}', 0)

    async def more_polls(count: int) -> None:
        """Wait until `count` more polls started: all but the one in flight read what the
        device holds now, and what they would have published has had a poll's time to come."""
        target = await polls() + count
        await until(lambda: polls_reach(target), what=f"{count} more polls")

    async def polls_reach(target: float) -> bool:
        return await polls() >= target

    async with recording(broker.port, f"{PREFIX}/#") as rec:
        daemons.start(config)
        await rec.wait_for(lambda: rec.payloads(topic))
        await rec.wait_for(lambda: len(rec.messages) >= 3)  # statuses + first value
        sim.set_value("dev", "voltage", 230.25)  # +0.5: under the deadband
        await more_polls(6)  # five polls of 230.25
        assert [b["value"] for b in rec.values(topic)] == [229.75]
        sim.set_value("dev", "voltage", 231.0)  # +1.25 from the last published
        await rec.wait_for(lambda: len(rec.payloads(topic)) == 2)
        await more_polls(4)  # 231.0 again: not a change
        assert [b["value"] for b in rec.values(topic)] == [229.75, 231.0]


async def test_dead_device_goes_offline_while_live_one_keeps_publishing(
    tmp_path: Path, broker: Broker, device: tuple[Simulator, int, dict[str, Any]],
    daemons: Daemons,
) -> None:
    """A device that does not answer goes offline after offline_after polls; others go on."""
    _, port, _ = device
    points = [{"name": "voltage", "table": "input", "address": 0, "type": "float32"}]
    dead = {"name": "ghost", "link": "nowhere", "interval": "200ms", "offline_after": 2,
            "points": [{"name": "x", "address": 0}]}
    nowhere = {"name": "nowhere", "type": "tcp", "host": "127.0.0.1", "port": free_port(),
               "timeout": "200ms"}
    config = write_config(tmp_path / "bridge.yaml", broker.port, port, points,
                          extra_devices=[dead], extra_links=[nowhere])
    async with recording(broker.port, f"{PREFIX}/#") as rec:
        d = daemons.start(config)
        await rec.wait_for(lambda: rec.last(f"{PREFIX}/ghost/status") == b"offline")
        before = len(rec.payloads(f"{PREFIX}/dev/voltage"))
        await rec.wait_for(lambda: len(rec.payloads(f"{PREFIX}/dev/voltage")) >= before + 4)
        assert rec.last(f"{PREFIX}/dev/status") == b"online"
    log = d.output()
    assert log.count('"device offline"') == 1, log  # one line per change, not per failure


async def test_bad_config_is_refused_before_touching_anything(
    tmp_path: Path, broker: Broker, daemons: Daemons
) -> None:
    """`run` with an invalid config exits 78 with file:line: path: message."""
    config = tmp_path / "bad.yaml"
    write_config(config, broker.port, free_port(), [{"name": "x", "address": 0, "type": "int33"}])
    d = daemons.start(config)
    assert d.wait() == 78
    assert "bad.yaml:" in d.output()
    assert "devices[0].points[0].type" in d.output()
    assert "int33" in d.output()


async def test_mqtt_311_brokers_get_the_same_contract(
    tmp_path: Path, broker: Broker, device: tuple[Simulator, int, dict[str, Any]],
    daemons: Daemons,
) -> None:
    """protocol: 3.1.1 (on aiomqtt) publishes the same topics, payloads and statuses."""
    _, port, _ = device
    points = [{"name": "voltage", "table": "input", "address": 0, "type": "float32",
               "unit": "V"}]
    config = write_config(tmp_path / "bridge.yaml", broker.port, port, points,
                          mqtt={"protocol": "3.1.1"})
    async with recording(broker.port, f"{PREFIX}/#") as rec:
        d = daemons.start(config)
        await rec.wait_for(lambda: rec.payloads(f"{PREFIX}/dev/voltage"))
        body = json.loads(rec.payloads(f"{PREFIX}/dev/voltage")[-1])
        assert (body["value"], body["unit"]) == (229.75, "V")
        assert rec.last(f"{PREFIX}/status") == b"online"
        d.signal(signal.SIGTERM)
        assert d.wait() == 0, d.output()
        await rec.wait_for(lambda: rec.last(f"{PREFIX}/status") == b"offline")
    assert '"protocol": "3.1.1"' in d.output()
