"""Writes end to end: `m2m-bridge run` as a subprocess, a real mosquitto, a pymodbus device.

Commands go in over MQTT (3.1.1 and 5), land on the simulated slave, whose registers and count
of write requests received are the proof: refusals must leave that count untouched.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bridge.codec import Field, encode
from bridge.config import TcpLink, load_config
from bridge.simulator import Simulator
from tests.helpers import Broker, Daemon, Recorder, free_port, mosquitto, recording, run_cli
from tests.test_e2e import NUMERIC, ORDERS, write_config

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
    with mosquitto(tmp_path) as b:
        yield b


@pytest.fixture
async def setup(
    tmp_path: Path, broker: Broker
) -> AsyncIterator[tuple[Simulator, Path, Recorder]]:
    """Device, daemon (polling hourly, so point topics carry read-backs) and a recorder."""
    config = write_config(tmp_path / "bridge.yaml", broker.port, free_port(), points(),
                          device={"interval": "1h"})
    sim = Simulator(load_config(config))
    await sim.start()
    daemon = Daemon(config)
    try:
        async with recording(broker.port, f"{PREFIX}/#") as rec:
            daemon.start()
            # Device statuses go out after the /set subscriptions are made.
            await rec.wait_for(lambda: rec.last(f"{PREFIX}/dev/status") == b"online")
            yield sim, config, rec
    finally:
        daemon.stop()
        await sim.stop()
        assert "Traceback" not in daemon.output(), daemon.output()


async def send(port: int, topic: str, payload: bytes | str, **props: Any) -> None:
    """Publish one command as an MQTT 5 client (properties such as ResponseTopic optional)."""
    properties = None
    if props:
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        for key, value in props.items():
            setattr(properties, key, value)
    async with aiomqtt.Client("127.0.0.1", port, identifier=f"cmd-{uuid.uuid4().hex[:8]}",
                              protocol=aiomqtt.ProtocolVersion.V5) as client:
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
    await rec.wait_for(lambda: all(results(rec, p["name"]) for p, _ in cases), 20)
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
    await rec.wait_for(lambda: all(results(rec, n) for n in names), 20)
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



@pytest.mark.parametrize(
    ("point", "payload", "reason"),
    [
        ("voltage", "230", "unknown device or point"),  # read-only: published to by hand
        ("nosuch", "1", "unknown device or point"),
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
    """Each refused command gets ok:false with the reason; the device sees no request."""
    sim, _, rec = setup
    await send(broker.port, f"{PREFIX}/dev/{point}/set", payload)
    if point in ("voltage", "nosuch"):
        # Not subscribed: the broker never delivers it, which is the first line of defence.
        await asyncio.sleep(0.5)
        assert not results(rec, point)
    else:
        await rec.wait_for(lambda: results(rec, point), 5)
        result = results(rec, point)[-1]
        assert result["ok"] is False
        assert reason in result["error"]
        audit = [json.loads(line) for line in config_log(setup).splitlines()
                 if '"bridge.audit"' in line]
        assert audit[-1]["outcome"] == "refused"
        assert audit[-1]["topic"] == f"{PREFIX}/dev/{point}/set"
        assert audit[-1]["value"] == payload
    assert sim.write_requests("dev") == 0


async def test_rate_limit_refuses_a_second_write_within_a_second(
    setup: tuple[Simulator, Path, Recorder], broker: Broker
) -> None:
    """Two quick commands to one point: the first is written, the second refused."""
    sim, _, rec = setup
    await send(broker.port, f"{PREFIX}/dev/uint16_abcd/set", "1")
    await send(broker.port, f"{PREFIX}/dev/uint16_abcd/set", "2")
    await rec.wait_for(lambda: len(results(rec, "uint16_abcd")) == 2, 5)
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
                correlation = message.properties.CorrelationData
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
