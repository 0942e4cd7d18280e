"""Home Assistant discovery end to end: the daemon, a pymodbus device and a real mosquitto.

What Home Assistant would see: retained documents for the gateway and each device when the
bridge connects, again when HA announces `online`, an empty retained document for a device a
reload removed, and state topics whose payloads the documents' templates can read.
"""

from __future__ import annotations

import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import yaml

from tests.helpers import Daemon, free_port, mosquitto, recording, simulated, until

pytestmark = pytest.mark.integration  # starts processes or socket servers

PREFIX = "m2m/ha"
GW_DOC = "homeassistant/device/ha-gw/config"
METER_DOC = "homeassistant/device/ha-gw_meter/config"
PUMP_DOC = "homeassistant/device/ha-gw_pump/config"


def write_config(tmp_path: Path, broker: int, device: int, *, pump: bool = True) -> Path:
    devices: list[dict[str, Any]] = [
        {"name": "meter", "link": "plc", "unit": 1, "interval": "200ms",
         "manufacturer": "Eastron", "model": "SDM630",
         "points": [{"name": "voltage", "address": 0, "type": "float32", "unit": "V",
                     "simulate": {"value": 230.5}},
                    {"name": "energy", "address": 2, "type": "uint32", "unit": "kWh"}]},
    ]
    if pump:
        devices.append({"name": "pump", "link": "plc", "unit": 2, "interval": "200ms",
                        "points": [{"name": "run", "table": "coil", "address": 0,
                                    "writable": True}]})
    doc = {
        "version": 1,
        "gateway": {"id": "ha-gw", "state_dir": str(tmp_path / "state")},
        "mqtt": {"host": "127.0.0.1", "port": broker, "topic_prefix": PREFIX,
                 "homeassistant": {}},
        "links": [{"name": "plc", "type": "tcp", "host": "127.0.0.1", "port": device,
                   "timeout": "2s"}],
        "devices": devices,
    }
    path = tmp_path / "bridge.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture
async def device(tmp_path: Path) -> AsyncIterator[int]:
    port = free_port()
    async with simulated(write_config(tmp_path, 1, port), seed=1):
        yield port


async def retained(port: int, topic: str) -> bytes | None:
    """What a subscriber arriving now is given on `topic` (None: nothing retained). A marker
    published after the subscribe arrives after any retained message (one session, in order)."""
    marker = f"{PREFIX}/test-marker"
    async with aiomqtt.Client("127.0.0.1", port, identifier="ha-test-retained") as client:
        await client.subscribe(topic, qos=1)
        await client.subscribe(marker, qos=1)
        await client.publish(marker, b"end", qos=1)
        found: bytes | None = None
        async for message in client.messages:
            if str(message.topic) == marker:
                return found
            assert isinstance(message.payload, bytes)
            found = message.payload
    return found


async def test_discovery_documents_follow_the_bridge_and_home_assistant(
    tmp_path: Path, device: int
) -> None:
    broker_port = free_port()
    config = write_config(tmp_path, broker_port, device)
    daemon = Daemon(config)
    with mosquitto(tmp_path, port=broker_port):
        # One recorder for both trees: two would share a client id (tests.helpers.recording).
        async with recording(broker_port, "#") as ha:
            bridge = ha
            daemon.start()
            try:
                await daemon.ready()
                await ha.wait_for(lambda: {GW_DOC, METER_DOC, PUMP_DOC} <= {
                    t for t, _, _ in ha.messages})
                meter = json.loads(ha.last(METER_DOC) or b"{}")
                voltage = meter["cmps"]["voltage"]
                assert (voltage["p"], voltage["device_class"], voltage["state_class"]) == (
                    "sensor", "voltage", "measurement")
                assert meter["cmps"]["energy"]["state_class"] == "total_increasing"
                assert meter["dev"]["via_device"] == "ha-gw"
                pump = json.loads(ha.last(PUMP_DOC) or b"{}")
                assert pump["cmps"]["run"]["p"] == "switch"
                assert pump["cmps"]["run"]["command_topic"] == f"{PREFIX}/pump/run/set"

                # The state topic carries what the template reads.
                state = voltage["state_topic"]
                await bridge.wait_for(lambda: bridge.payloads(state))
                assert json.loads(bridge.payloads(state)[-1])["value"] == pytest.approx(230.5)
                # Both availability topics say online (retained statuses).
                available = [a["topic"] for a in meter["availability"]]
                assert available == [f"{PREFIX}/status", f"{PREFIX}/meter/status"]
                await bridge.wait_for(lambda: all(bridge.last(t) == b"online" for t in available))

                # Home Assistant restarts and says so: every document comes again.
                before = len(ha.payloads(METER_DOC))
                async with aiomqtt.Client("127.0.0.1", broker_port) as hass:
                    await hass.publish("homeassistant/status", b"online", qos=1)
                await ha.wait_for(lambda: len(ha.payloads(METER_DOC)) > before)
                assert len(ha.payloads(GW_DOC)) >= 2

                # A reload removes the pump: its document is emptied, so HA removes it.
                write_config(tmp_path, broker_port, device, pump=False)
                daemon.signal(signal.SIGHUP)
                await ha.wait_for(lambda: ha.payloads(PUMP_DOC)[-1:] == [b""])
                assert await retained(broker_port, PUMP_DOC) is None
                assert json.loads(await retained(broker_port, METER_DOC) or b"{}") == meter
                daemon.running()
            finally:
                daemon.stop()


async def test_documents_wait_for_the_broker_and_come_on_connect(
    tmp_path: Path, device: int
) -> None:
    """The broker is away at start: the documents are published once it is there."""
    broker_port = free_port()
    daemon = Daemon(write_config(tmp_path, broker_port, device))
    daemon.start()
    try:
        await daemon.ready()
        await until(lambda: bool(daemon.events("broker unreachable")),
                    what="the broker to be missed")
        with mosquitto(tmp_path, port=broker_port):
            async with recording(broker_port, "homeassistant/#") as ha:
                await ha.wait_for(lambda: bool(ha.payloads(METER_DOC) and ha.payloads(GW_DOC)))
            assert json.loads(await retained(broker_port, METER_DOC) or b"{}")["cmps"]
    finally:
        daemon.stop()
