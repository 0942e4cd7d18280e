"""Writes end to end: `m2m-bridge run` as a subprocess, a real mosquitto, a pymodbus device.

Commands go in over MQTT (3.1.1 and 5), land on the simulated slave, whose registers and count
of write requests received are the proof: refusals must leave that count untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import yaml
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bridge.config import TcpLink, load_config
from bridge.core.codec import Field, encode
from bridge.sim.tcp import Simulator
from tests.helpers import (
    Broker,
    Daemon,
    Recorder,
    free_port,
    mosquitto,
    recording,
    run_cli,
    simulated,
)
from tests.test_e2e import NUMERIC, ORDERS, write_config

pytestmark = pytest.mark.integration  # starts processes or socket servers

PREFIX = "m2m/e2e"
# Values to write: in range for each type, different from anything the device starts with.
WRITES: dict[str, int | float] = {
    "int16": -2222,
    "uint16": 65000,
    "int32": -2_000_000_001,
    "uint32": 4_000_000_001,
    "int64": -(2**62) - 7,
    "uint64": 2**64 - 3,
    "float32": -17.25,
    "float64": 98765.4321,
}


def points() -> list[dict[str, Any]]:
    """Writable points of every numeric type and byte order, and the refusal cases."""
    out: list[dict[str, Any]] = []
    address = 0
    for type_ in NUMERIC:
        for order in ORDERS:
            out.append({"name": f"{type_}_{order.lower()}", "address": address, "type": type_,
                        "byte_order": order, "writable": True})
            address += 4
    return out + [
        {"name": "setpoint", "address": 300, "type": "int16", "scale": 0.1, "unit": "°C",
         "writable": True, "min": 5, "max": 30},
        {"name": "mode", "address": 301, "values": {0: "stopped", 1: "running", 2: "fault"},
         "writable": True},
        {"name": "pump", "table": "coil", "address": 4, "writable": True},
        {"name": "label", "address": 310, "type": "string", "count": 4, "writable": True},
        {"name": "status_word", "address": 320},
        {"name": "voltage", "table": "input", "address": 0, "type": "float32"},
    ]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    # Subscriptions are logged, so a test can read what the bridge subscribed to.
    with mosquitto(tmp_path, "log_type subscribe\n") as b:
        yield b


@pytest.fixture
async def setup(
    tmp_path: Path, broker: Broker
) -> AsyncIterator[tuple[Simulator, Path, Recorder]]:
    """Device, daemon (polling hourly, so point topics carry read-backs) and a recorder."""
    config = write_config(tmp_path / "bridge.yaml", broker.port, free_port(), points(),
                          device={"interval": "1h"})
    async with bridged(config, broker) as (sim, _, rec):
        yield sim, config, rec


@contextlib.asynccontextmanager
async def bridged(
    config: Path, broker: Broker
) -> AsyncIterator[tuple[Simulator, Daemon, Recorder]]:
    """The config's device simulated, the daemon on it, and a recorder of every topic; once
    the device is online (its status goes out after the /set subscriptions are made)."""
    async with simulated(config) as sim:
        daemon = Daemon(config)
        try:
            with daemon:
                async with recording(broker.port, f"{PREFIX}/#") as rec:
                    daemon.start()
                    await rec.wait_for(lambda: rec.last(f"{PREFIX}/dev/status") == b"online")
                    yield sim, daemon, rec
        finally:
            assert "Traceback" not in daemon.output(), daemon.output()


async def send(
    port: int, topic: str, payload: bytes | str,
    protocol: aiomqtt.ProtocolVersion = aiomqtt.ProtocolVersion.V5, **props: Any,
) -> None:
    """Publish one command as an MQTT 5 client (properties such as ResponseTopic optional)."""
    properties = None
    if props:
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        for key, value in props.items():
            setattr(properties, key, value)
    async with aiomqtt.Client("127.0.0.1", port, identifier=f"cmd-{uuid.uuid4().hex[:8]}",
                              protocol=protocol) as client:
        await client.publish(topic, payload, qos=1, properties=properties)


def config_log(setup: tuple[Simulator, Path, Recorder]) -> str:
    """The daemon's JSON log (tests.helpers.Daemon writes it next to the config)."""
    return setup[1].with_suffix(".log").read_text()


def results(rec: Recorder, point: str) -> list[dict[str, Any]]:
    return [json.loads(p) for p in rec.payloads(f"{PREFIX}/dev/{point}/set/result")]


async def test_every_numeric_type_and_byte_order_is_written_in_one_request_and_read_back(
    setup: tuple[Simulator, Path, Recorder], broker: Broker
) -> None:
    """Device words equal codec.encode; the read-back is published; one request per point."""
    sim, _, rec = setup
    cases = [(p, WRITES[p["type"]]) for p in points()[: len(NUMERIC) * len(ORDERS)]]
    for point, value in cases:
        await send(broker.port, f"{PREFIX}/dev/{point['name']}/set", json.dumps(value))
    await rec.wait_for(lambda: all(results(rec, p["name"]) for p, _ in cases))
    for point, value in cases:
        name = point["name"]
        result = results(rec, name)[-1]
        assert result["ok"] is True, (name, result)
        field = Field(0, point["type"], point["byte_order"])
        size = len(encode(field, value))
        words = sim.registers("dev", "holding", point["address"], size)
        assert words == encode(field, value), name
        if point["type"] == "float32":
            assert result["value"] == pytest.approx(value, rel=1e-6)
        else:
            assert result["value"] == value, name
        # Polls are hourly, so only the read-back can carry the new value to the point topic.
        readings = [r["value"] for r in rec.values(f"{PREFIX}/dev/{name}")]
        assert result["value"] in readings, name
    assert sim.write_requests("dev") == len(cases)  # FC6/FC16: never split, never retried


async def test_scaled_enum_coil_and_string_points_and_the_payload_forms(
    setup: tuple[Simulator, Path, Recorder], broker: Broker
) -> None:
    """Scale is inverted, enum names map to codes, on/off drive coils, text fills strings."""
    sim, _, rec = setup
    await send(broker.port, f"{PREFIX}/dev/setpoint/set", '{"value": 21.5}')
    await send(broker.port, f"{PREFIX}/dev/mode/set", "running")
    await send(broker.port, f"{PREFIX}/dev/pump/set", "ON")
    await send(broker.port, f"{PREFIX}/dev/label/set", '"AB-12"')
    names = ("setpoint", "mode", "pump", "label")
    await rec.wait_for(lambda: all(results(rec, n) for n in names))
    assert [results(rec, n)[-1] for n in names] == [
        {"ok": True, "value": 21.5}, {"ok": True, "value": "running"},
        {"ok": True, "value": True}, {"ok": True, "value": "AB-12"},
    ]
    assert sim.registers("dev", "holding", 300, 2) == [215, 1]
    assert sim.registers("dev", "coil", 4, 1) == [1]
    assert sim.registers("dev", "holding", 310, 4) == encode(Field(0, "string", count=4), "AB-12")
    read_back = [r for r in rec.values(f"{PREFIX}/dev/setpoint") if r["value"] == 21.5]
    assert read_back, "the read-back is published as a reading"
    assert read_back[0]["unit"] == "°C"



def audit_lines(log: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.splitlines() if '"bridge.audit"' in line]


@pytest.mark.parametrize(
    ("point", "payload", "reason"),
    [
        ("voltage", "230", "point 'voltage' is read-only (writable is not set)"),
        ("status_word", "1", "point 'status_word' is read-only"),
        ("nosuch", "1", "device 'dev' has no point 'nosuch'"),
        ("setpoint", "31", "31 is above max 30"),
        ("setpoint", "21.55", "register step"),
        ("setpoint", "warm", "payload is not JSON or a value: 'warm'"),
        ("setpoint", '{"value": 20, "ts": 1}', "expected {\"value\": …}"),
        ("mode", "fast", "'fast' is not one of stopped (0), running (1), fault (2)"),
        ("label", '"much too long"', "longer than 8 characters"),
        ("uint16_abcd", "-1", "outside the uint16 range"),
    ],
)
async def test_refusals_are_answered_and_write_nothing(
    setup: tuple[Simulator, Path, Recorder], broker: Broker, point: str, payload: str,
    reason: str,
) -> None:
    """Each refused command (read-only and unknown points too) gets ok:false with the reason
    and an audit line; the device sees no request."""
    sim, _, rec = setup
    await send(broker.port, f"{PREFIX}/dev/{point}/set", payload)
    await rec.wait_for(lambda: results(rec, point))
    result = results(rec, point)[-1]
    assert result["ok"] is False
    assert reason in result["error"]
    audit = audit_lines(config_log(setup))
    assert audit[-1]["outcome"] == "refused"
    assert audit[-1]["topic"] == f"{PREFIX}/dev/{point}/set"
    assert audit[-1]["value"] == payload
    assert audit[-1]["reason"] == result["error"]
    assert sim.write_requests("dev") == 0


async def test_the_bridge_subscribes_to_one_set_filter_and_answers_an_unknown_device(
    setup: tuple[Simulator, Path, Recorder], broker: Broker, tmp_path: Path
) -> None:
    """`<prefix>/+/+/set` is the only subscription; a command to a device that does not
    exist is answered on its /result too."""
    sim, _, rec = setup
    log = (tmp_path / "mosquitto" / f"{broker.port}.log").read_text()
    # mosquitto logs "<time>: <client id> <qos> <filter>" for each filter subscribed to.
    subscribed = set(re.findall(r"^\d+: m2m-bridge-e2e \d (\S+)$", log, re.MULTILINE))
    assert subscribed == {f"{PREFIX}/+/+/set"}, log
    await send(broker.port, f"{PREFIX}/ghost/valve/set", "1")
    topic = f"{PREFIX}/ghost/valve/set/result"
    await rec.wait_for(lambda: rec.payloads(topic))
    assert rec.values(topic) == [{"ok": False, "error": "unknown device 'ghost'"}]
    assert audit_lines(config_log(setup))[-1]["reason"] == "unknown device 'ghost'"
    assert sim.write_requests("dev") == 0


async def test_rate_limit_refuses_a_second_write_within_a_second(
    setup: tuple[Simulator, Path, Recorder], broker: Broker
) -> None:
    """Two quick commands to one point: the first is written, the second refused."""
    sim, _, rec = setup
    # One connection, two publishes back to back: two connections in a row could be more than
    # a second apart on a loaded machine, and then both writes would rightly go through.
    async with aiomqtt.Client("127.0.0.1", broker.port, identifier="cmd-burst") as client:
        await client.publish(f"{PREFIX}/dev/uint16_abcd/set", "1", qos=1)
        await client.publish(f"{PREFIX}/dev/uint16_abcd/set", "2", qos=1)
    await rec.wait_for(lambda: len(results(rec, "uint16_abcd")) == 2)
    # The refusal needs no I/O, so it may be answered before the write's result.
    refused, written = sorted(results(rec, "uint16_abcd"), key=lambda r: r["ok"])
    assert written == {"ok": True, "value": 1}
    assert refused["ok"] is False
    assert "rate limit" in refused["error"]
    assert sim.write_requests("dev") == 1


async def test_mqtt5_response_topic_gets_the_result_with_correlation_data(
    setup: tuple[Simulator, Path, Recorder], broker: Broker
) -> None:
    """A command carrying ResponseTopic + CorrelationData is answered there, with them."""
    sim, _, _ = setup
    reply_topic = "client/replies/42"
    async with aiomqtt.Client("127.0.0.1", broker.port, identifier="rpc-client",
                              protocol=aiomqtt.ProtocolVersion.V5) as client:
        await client.subscribe(reply_topic, qos=1)
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = reply_topic
        props.CorrelationData = b"req-7"
        await client.publish(f"{PREFIX}/dev/int32_cdab/set", b"123456", qos=1,
                             properties=props)
        bad = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        bad.ResponseTopic = reply_topic
        bad.CorrelationData = b"req-8"
        await client.publish(f"{PREFIX}/dev/mode/set", b"fast", qos=1, properties=bad)
        answers: dict[bytes, Any] = {}
        async with asyncio.timeout(5):
            async for message in client.messages:
                assert message.properties is not None
                correlation = message.properties.CorrelationData  # type: ignore[attr-defined]
                assert isinstance(message.payload, bytes)
                answers[correlation] = json.loads(message.payload)
                if len(answers) == 2:
                    break
    assert answers[b"req-7"] == {"ok": True, "value": 123456}
    assert answers[b"req-8"]["ok"] is False
    assert sim.write_requests("dev") == 1


async def test_write_cli_config_and_url_forms(
    setup: tuple[Simulator, Path, Recorder]
) -> None:
    """`write -c FILE DEVICE POINT VALUE` and `write URL … VALUE` write and print the read-back."""
    sim, config, _ = setup
    done = await asyncio.to_thread(run_cli, "write", "-c", str(config), "dev", "setpoint", "12.3")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "12.3"
    assert sim.registers("dev", "holding", 300, 1) == [123]

    link = load_config(config).links[0]
    assert isinstance(link, TcpLink)
    url = f"tcp://127.0.0.1:{link.port}"
    done = await asyncio.to_thread(
        run_cli, "write", url, "--unit", "1", "--table", "holding", "--address", "500",
        "--type", "float32", "--byte-order", "CDAB", "-2.5",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "-2.5"
    assert sim.registers("dev", "holding", 500, 2) == encode(Field(0, "float32", "CDAB"), -2.5)

    writes = sim.write_requests("dev")
    refused = await asyncio.to_thread(run_cli, "write", "-c", str(config), "dev", "voltage", "1")
    assert refused.returncode == 2
    assert "read-only" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    over = await asyncio.to_thread(run_cli, "write", "-c", str(config), "dev", "setpoint", "99")
    assert over.returncode == 2
    assert "99 is above max 30" in over.stderr
    wrong_table = await asyncio.to_thread(
        run_cli, "write", url, "--table", "input", "--address", "0", "5")
    assert wrong_table.returncode == 2
    assert sim.write_requests("dev") == writes


def small_points(*, writable: str) -> list[dict[str, Any]]:
    """Two holding points; only `writable` accepts commands."""
    return [
        {"name": "setpoint", "address": 0, "type": "float32", "writable": writable == "setpoint"},
        {"name": "level", "address": 2, "type": "uint16", "writable": writable == "level"},
    ]


@pytest.fixture
async def small(tmp_path: Path, broker: Broker, request: pytest.FixtureRequest
                ) -> AsyncIterator[tuple[Simulator, Path, Daemon, Recorder]]:
    """The daemon on `small_points`, speaking the MQTT version the test is parametrized with."""
    protocol = getattr(request, "param", "5")
    config = write_config(tmp_path / "small.yaml", broker.port, free_port(),
                          small_points(writable="setpoint"), device={"interval": "1h"},
                          mqtt={"protocol": protocol})
    async with bridged(config, broker) as (sim, daemon, rec):
        yield sim, config, daemon, rec


@pytest.mark.parametrize("small", ["3.1.1", "5"], indirect=True)
async def test_every_command_is_answered_over_either_mqtt_version(
    small: tuple[Simulator, Path, Daemon, Recorder], broker: Broker
) -> None:
    """3.1.1 (aiomqtt) and 5 (wire client): writable, read-only and unknown points all answer."""
    sim, _, daemon, rec = small
    v311 = aiomqtt.ProtocolVersion.V311
    await send(broker.port, f"{PREFIX}/dev/level/set", "5", protocol=v311)
    await send(broker.port, f"{PREFIX}/dev/pressure/set", "5", protocol=v311)
    await send(broker.port, f"{PREFIX}/dev/setpoint/set", "2.5", protocol=v311)
    await rec.wait_for(lambda: all(results(rec, p) for p in ("level", "pressure", "setpoint")))
    assert results(rec, "level") == [
        {"ok": False, "error": "point 'level' is read-only (writable is not set)"}]
    assert results(rec, "pressure") == [
        {"ok": False, "error": "device 'dev' has no point 'pressure'"}]
    assert results(rec, "setpoint") == [{"ok": True, "value": 2.5}]
    assert sim.write_requests("dev") == 1
    outcomes = sorted(a["outcome"] for a in audit_lines(daemon.output()))
    assert outcomes == ["ok", "refused", "refused"]


async def test_a_reload_changes_which_points_answer_ok(
    small: tuple[Simulator, Path, Daemon, Recorder], broker: Broker
) -> None:
    """SIGHUP making `level` writable and `setpoint` read-only applies to the next commands."""
    sim, config, daemon, rec = small
    await send(broker.port, f"{PREFIX}/dev/level/set", "5")
    await rec.wait_for(lambda: results(rec, "level"))
    assert results(rec, "level")[-1]["ok"] is False

    doc = yaml.safe_load(config.read_text())
    doc["devices"][0]["points"] = small_points(writable="level")
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    daemon.signal(signal.SIGHUP)
    await rec.wait_for(lambda: '"reloaded"' in daemon.output())

    await send(broker.port, f"{PREFIX}/dev/level/set", "7")
    await send(broker.port, f"{PREFIX}/dev/setpoint/set", "1.5")
    await rec.wait_for(lambda: len(results(rec, "level")) == 2 and results(rec, "setpoint"))
    assert results(rec, "level")[-1] == {"ok": True, "value": 7}
    assert results(rec, "setpoint") == [
        {"ok": False, "error": "point 'setpoint' is read-only (writable is not set)"}]
    assert sim.registers("dev", "holding", 2, 1) == [7]
    assert sim.write_requests("dev") == 1


async def test_on_change_does_not_publish_a_read_back_value_again(
    tmp_path: Path, broker: Broker
) -> None:
    """With `report: on-change`, the read-back is the last published value: the polls after
    it, which read the same value, publish nothing for the point."""
    config = write_config(
        tmp_path / "onchange.yaml", broker.port, free_port(),
        [{"name": "setpoint", "address": 0, "writable": True},
         {"name": "ticker", "address": 1}],  # one block with setpoint: read in the same polls
        device={"interval": "200ms", "report": "on-change"},
    )
    setpoint, ticker = f"{PREFIX}/dev/setpoint", f"{PREFIX}/dev/ticker"
    async with bridged(config, broker) as (sim, _, rec):  # no Traceback in its log, after
        await rec.wait_for(lambda: rec.payloads(setpoint))
        await send(broker.port, f"{setpoint}/set", "42")
        await rec.wait_for(lambda: results(rec, "setpoint"))
        assert results(rec, "setpoint") == [{"ok": True, "value": 42}]
        # Polls that start after the write: each ticker change proves one was published.
        for value in (1, 2, 3):
            sim.set_value("dev", "ticker", value)

            def seen(wanted: int = value) -> bool:
                return wanted in [r["value"] for r in rec.values(ticker)]

            await rec.wait_for(seen)
        assert [r["value"] for r in rec.values(setpoint)] == [100, 42]
