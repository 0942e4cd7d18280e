"""Sparkplug B edge node end to end: `m2m-bridge run` with `mqtt.format: sparkplug`, a
simulated Modbus device, a real mosquitto; what arrives is decoded with pysparkplug (and the
properties with its module compiled from Eclipse Tahu's schema), not with our own decoder.

The spec's normative statements each test proves are named in its docstring (`tck-id-…`).
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import pysparkplug as ps
import pytest
import yaml
from pysparkplug import _protobuf as tahu  # compiled from Eclipse Tahu's sparkplug_b.proto

from bridge.config import load_config
from bridge.sim.tcp import Simulator
from tests.helpers import Daemon, Recorder, free_port, metrics, mosquitto, recording, until

pytestmark = pytest.mark.integration  # starts processes or socket servers

GROUP, NODE = "plant-1", "gw-sp"
NS = f"spBv1.0/{GROUP}"
NBIRTH, NDEATH = f"{NS}/NBIRTH/{NODE}", f"{NS}/NDEATH/{NODE}"


def dtopic(kind: str, device: str = "meter") -> str:
    return f"{NS}/{kind}/{NODE}/{device}"


POINTS: list[dict[str, Any]] = [
    {"name": "voltage", "address": 0, "type": "float32", "unit": "V"},
    {"name": "temp", "address": 2, "type": "int16", "scale": 0.1, "unit": "°C"},
    {"name": "delta", "address": 3, "type": "int16"},
    {"name": "state", "address": 4, "values": {0: "stopped", 1: "running"}},
    {"name": "setpoint", "address": 5, "type": "uint16", "writable": True, "min": 0,
     "max": 100},
    {"name": "pump", "table": "coil", "address": 0},
]
VALUES: dict[str, Any] = {"voltage": 230.5, "temp": -12.5, "delta": -7, "state": "running",
                          "setpoint": 10, "pump": True}


def write_config(tmp_path: Path, broker: int, device: int, *, interval: str = "100ms",
                 extra_device: bool = False, metrics_port: int | None = None,
                 **sparkplug: Any) -> Path:
    devices = [{"name": "meter", "link": "plc", "unit": 1, "interval": interval,
                "points": POINTS}]
    if extra_device:
        devices.append({"name": "meter2", "link": "plc", "unit": 2, "interval": interval,
                        "points": POINTS[:1]})
    doc: dict[str, Any] = {
        "version": 1,
        "gateway": {"id": NODE, "state_dir": str(tmp_path / "state")},
        "mqtt": {"host": "127.0.0.1", "port": broker, "format": "sparkplug",
                 "sparkplug": {"group_id": GROUP, **sparkplug}},
        "links": [{"name": "plc", "type": "tcp", "host": "127.0.0.1", "port": device,
                   "timeout": "2s"}],
        "devices": devices,
    }
    if metrics_port is not None:
        doc["metrics"] = {"host": "127.0.0.1", "port": metrics_port}
    path = tmp_path / "bridge.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
    return path


@pytest.fixture
async def device(tmp_path: Path) -> AsyncIterator[tuple[Simulator, int]]:
    port = free_port()
    (tmp_path / "sim").mkdir()
    sim = Simulator(load_config(write_config(tmp_path / "sim", 1, port, extra_device=True)))
    await sim.start()
    try:
        for name, value in VALUES.items():
            sim.set_value("meter", name, value)
        sim.set_value("meter2", "voltage", 1.5)
        yield sim, port
    finally:
        await sim.stop()


@pytest.fixture
def daemons() -> Any:
    started: list[Daemon] = []
    yield started
    for daemon in started:
        daemon.stop()


def start(daemons: list[Daemon], config: Path) -> Daemon:
    daemon = Daemon(config)
    daemons.append(daemon)
    daemon.start()
    return daemon


# --- decoding what arrived --------------------------------------------------------------------


def kind(topic: str) -> str:
    return topic.split("/")[2]


def node_messages(rec: Recorder) -> list[tuple[str, bytes]]:
    """NBIRTH/NDEATH/DBIRTH/DDATA/DDEATH of our node, in arrival order."""
    return [(t, p) for t, p, _ in rec.messages
            if t.startswith(NS + "/") and t.split("/")[3] == NODE and "CMD" not in kind(t)]


def births(rec: Recorder, topic: str) -> list[ps.DBirth]:
    return [ps.DBirth.decode(p) for p in rec.payloads(topic)]


def bd_seq(metrics: tuple[ps.Metric, ...]) -> int:
    [found] = [m.value for m in metrics if m.name == "bdSeq"]
    assert isinstance(found, int)
    return found


def ddata(rec: Recorder, device: str = "meter") -> list[ps.DData]:
    """Every DDATA of `device`, decoded against the DBIRTH that came before it."""
    birth: ps.DBirth | None = None
    out = []
    for topic, payload in node_messages(rec):
        if topic == dtopic("DBIRTH", device):
            birth = ps.DBirth.decode(payload)
        elif topic == dtopic("DDATA", device):
            assert birth is not None, "DDATA before its DBIRTH"
            out.append(ps.DData.decode(payload, birth=birth))
    return out


def values(data: ps.DData) -> dict[str | None, Any]:
    return {m.name: m.value for m in data.metrics}


def seqs_are_continuous(rec: Recorder) -> int:
    """Every node message after an NBIRTH has the seq after the one before (NDEATH has none);
    return how many were checked."""
    seq: int | None = None
    checked = 0
    for topic, payload in node_messages(rec):
        k = kind(topic)
        if k == "NDEATH":
            seq = None
            continue
        got = tahu.Payload.FromString(payload).seq
        if k == "NBIRTH":
            assert got == 0
        elif seq is not None:
            assert got == (seq + 1) % 256, f"{topic}: seq {got} after {seq}"
            checked += 1
        seq = got
    return checked


async def send(port: int, topic: str, payload: bytes, *, retain: bool = False) -> None:
    async with aiomqtt.Client("127.0.0.1", port, identifier=f"host-{time.monotonic_ns()}") as c:
        await c.publish(topic, payload, qos=1, retain=retain)


def command(metrics: list[ps.Metric], cls: type[ps.NCmd] | type[ps.DCmd]) -> bytes:
    return cls(timestamp=ps.get_current_timestamp(), metrics=tuple(metrics)).encode()


def log_events(daemon: Daemon, event: str) -> list[dict[str, Any]]:
    return daemon.events(event)


async def polls(port: int) -> float:
    """Polls of `meter` the daemon serving metrics on `port` has started."""
    return (await metrics(port)).get('m2m_polls_total{device="meter",link="plc"}', 0.0)


async def polled(port: int, count: float, daemon: Daemon) -> bool:
    daemon.running()
    return await polls(port) >= count


# Offline messages of a persistent session, QoS 0 ones (all Sparkplug data) included.
QUEUE_QOS0 = "max_queued_messages 100000\nqueue_qos0_messages true\n"


async def persistent_session(tmp_path: Path, session: str) -> int:
    """A free port for mosquitto where `session` is a persistent subscription to our node's
    messages: from then on the broker keeps what arrives while the recorder is away."""
    port = free_port()
    with mosquitto(tmp_path, QUEUE_QOS0, port=port):
        async with recording(port, f"{NS}/#", session=session):
            pass
    return port


# --- tests ------------------------------------------------------------------------------------


async def test_births_data_seq_wrap_and_clean_stop(
    tmp_path: Path, device: tuple[Simulator, int], daemons: list[Daemon]
) -> None:
    """tck-id-payloads-nbirth-bdseq, tck-id-payloads-nbirth-seq (seq 0),
    tck-id-payloads-nbirth-rebirth-req (Node Control/Rebirth false);
    tck-id-payloads-dbirth-seq, tck-id-topics-dbirth-metric-reqs (every metric with name,
    alias, datatype and its value), engUnit and Quality 192;
    tck-id-payloads-alias-data-cmd-requirement (DDATA by alias);
    tck-id-payloads-sequence-num-incrementing (one counter, 255 wraps to 0);
    tck-id-payloads-nbirth-qos and -retain, tck-id-payloads-dbirth-qos (QoS 0, not retained);
    tck-id-operational-behavior-edge-node-intentional-disconnect-ndeath (a clean stop:
    DDEATH per device, then NDEATH with the NBIRTH's bdSeq); no JSON topic is published."""
    sim, port = device
    with mosquitto(tmp_path) as broker:
        config = write_config(tmp_path, broker.port, port, interval="40ms", extra_device=True)
        async with recording(broker.port, "#") as rec:
            daemon = start(daemons, config)
            await rec.wait_for(lambda: rec.payloads(dtopic("DBIRTH")))
            # Enough messages for the seq to wrap at least once.
            await rec.wait_for(lambda: len(node_messages(rec)) > 300, timeout=60)
            daemon.signal(signal.SIGTERM)
            assert daemon.wait() == 0
            await rec.wait_for(lambda: rec.payloads(NDEATH))
        [nbirth] = [ps.NBirth.decode(p) for p in rec.payloads(NBIRTH)]
        assert nbirth.seq == 0
        by_name = {m.name: m for m in nbirth.metrics}
        assert by_name["bdSeq"].datatype == ps.DataType.INT64
        assert by_name["Node Control/Rebirth"].datatype == ps.DataType.BOOLEAN
        assert by_name["Node Control/Rebirth"].value is False
        [dbirth] = births(rec, dtopic("DBIRTH"))
        metrics = {m.name: m for m in dbirth.metrics}
        assert {n: metrics[n].value for n in VALUES} == VALUES
        assert {n: metrics[n].datatype for n in VALUES} == {
            "voltage": ps.DataType.FLOAT, "temp": ps.DataType.DOUBLE, "delta": ps.DataType.INT16,
            "state": ps.DataType.STRING, "setpoint": ps.DataType.UINT16,
            "pump": ps.DataType.BOOLEAN,
        }
        assert len({m.alias for m in dbirth.metrics}) == len(POINTS)
        raw = tahu.Payload.FromString(rec.payloads(dtopic("DBIRTH"))[0]).metrics[0]
        props = dict(zip(raw.properties.keys, raw.properties.values, strict=True))
        assert props["engUnit"].string_value == "V"
        assert props["Quality"].int_value == 192
        data = ddata(rec)
        assert len(data) > 50
        assert values(data[-1]) == VALUES
        for payload in rec.payloads(dtopic("DDATA")):
            assert all(not m.HasField("name") for m in tahu.Payload.FromString(payload).metrics)
        assert seqs_are_continuous(rec) > 300
        wraps = [tahu.Payload.FromString(p).seq for t, p in node_messages(rec)
                 if kind(t) != "NDEATH"]
        assert 255 in wraps
        assert wraps.count(0) >= 2
        # SIGTERM: each device's DDEATH, then NDEATH (QoS 1) with the bdSeq of the NBIRTH.
        tail = [kind(t) for t, _ in node_messages(rec)][-3:]
        assert tail == ["DDEATH", "DDEATH", "NDEATH"]
        [death] = [ps.NDeath.decode(p) for p in rec.payloads(NDEATH)]
        assert death.bd_seq_metric.value == bd_seq(nbirth.metrics)
        assert all(not retained for _, _, retained in rec.messages)
        assert all(t.startswith("spBv1.0/") for t, _, _ in rec.messages), "a JSON topic"
    assert sim.write_requests("meter") == 0


async def test_bdseq_across_kill_9_and_restart(
    tmp_path: Path, device: tuple[Simulator, int], daemons: list[Daemon]
) -> None:
    """tck-id-payloads-ndeath-will-message (NDEATH is the will: QoS 1, not retained),
    tck-id-payloads-ndeath-bdseq and tck-id-payloads-nbirth-bdseq-repeat (its bdSeq is the
    NBIRTH's), tck-id-message-flow-edge-node-birth-publish-will-message-payload-bdSeq
    (one more on every connect, kept in the state dir across kill -9 and a restart)."""
    _, port = device
    with mosquitto(tmp_path) as broker:
        config = write_config(tmp_path, broker.port, port)
        async with recording(broker.port, f"{NS}/#") as rec:
            first = start(daemons, config)
            await rec.wait_for(lambda: rec.payloads(dtopic("DDATA")))
            [nbirth] = [ps.NBirth.decode(p) for p in rec.payloads(NBIRTH)]
            first_bd = bd_seq(nbirth.metrics)
            first.signal(signal.SIGKILL)
            first.wait()
            await rec.wait_for(lambda: rec.payloads(NDEATH))  # the will
            [will] = [ps.NDeath.decode(p) for p in rec.payloads(NDEATH)]
            assert will.bd_seq_metric.value == first_bd
            assert not [r for t, _, r in rec.messages if t == NDEATH and r]
            assert (tmp_path / "state" / "sparkplug-bdseq").read_text().strip() == str(first_bd)
            second = start(daemons, config)
            await rec.wait_for(lambda: len(rec.payloads(NBIRTH)) == 2)
            assert bd_seq(ps.NBirth.decode(rec.payloads(NBIRTH)[1]).metrics) == (
                (first_bd + 1) % 256)
            await rec.wait_for(lambda: len(rec.payloads(dtopic("DBIRTH"))) == 2)
            second.signal(signal.SIGTERM)
            assert second.wait() == 0
            await rec.wait_for(lambda: len(rec.payloads(NDEATH)) == 2)
            assert ps.NDeath.decode(rec.payloads(NDEATH)[1]).bd_seq_metric.value == (
                (first_bd + 1) % 256)


async def test_rebirth_and_dcmd_write_read_back_and_refusal(
    tmp_path: Path, device: tuple[Simulator, int], daemons: list[Daemon]
) -> None:
    """tck-id-operational-behavior-data-commands-rebirth-action-1/-2/-3 (NCMD rebirth: NBIRTH
    again, same bdSeq, seq 0, and every DBIRTH, without reconnecting);
    tck-id-operational-behavior-data-commands-rebirth-name-aliases (asked by name);
    a DCMD to a writable metric is written and read back as DDATA; a DCMD value over the
    point's max writes nothing (the register is unchanged) and is logged as refused."""
    sim, port = device
    with mosquitto(tmp_path) as broker:
        config = write_config(tmp_path, broker.port, port)
        async with recording(broker.port, f"{NS}/#") as rec:
            daemon = start(daemons, config)
            await rec.wait_for(lambda: rec.payloads(dtopic("DDATA")))
            rebirth = ps.Metric(timestamp=ps.get_current_timestamp(),
                                name="Node Control/Rebirth", datatype=ps.DataType.BOOLEAN,
                                value=True)
            await send(broker.port, f"{NS}/NCMD/{NODE}", command([rebirth], ps.NCmd))
            await rec.wait_for(lambda: len(rec.payloads(NBIRTH)) == 2)
            await rec.wait_for(lambda: len(rec.payloads(dtopic("DBIRTH"))) == 2)
            first, again = (ps.NBirth.decode(p) for p in rec.payloads(NBIRTH))
            assert again.seq == 0
            assert bd_seq(again.metrics) == bd_seq(first.metrics)
            assert not rec.payloads(NDEATH)
            assert len(log_events(daemon, "broker connected")) == 1
            assert seqs_are_continuous(rec) > 0

            [birth] = births(rec, dtopic("DBIRTH"))[-1:]
            alias = next(m.alias for m in birth.metrics if m.name == "setpoint")
            write = ps.Metric(timestamp=ps.get_current_timestamp(), name=None, alias=alias,
                              datatype=ps.DataType.UINT16, value=42)
            await send(broker.port, dtopic("DCMD"), command([write], ps.DCmd))
            await until(lambda: sim.registers("meter", "holding", 5, 1) == [42],
                        what="the DCMD written")
            await rec.wait_for(lambda: any(values(d).get("setpoint") == 42 for d in ddata(rec)))
            writes = sim.write_requests("meter")
            too_big = ps.Metric(timestamp=ps.get_current_timestamp(), name="setpoint",
                                datatype=ps.DataType.UINT16, value=101)
            await send(broker.port, dtopic("DCMD"), command([too_big], ps.DCmd))
            await until(lambda: any(e.get("outcome") == "refused"
                                    for e in log_events(daemon, "command")),
                        what="the refusal logged")
            assert sim.registers("meter", "holding", 5, 1) == [42]
            assert sim.write_requests("meter") == writes
            assert seqs_are_continuous(rec) > 0


async def test_primary_host_offline_and_online(
    tmp_path: Path, device: tuple[Simulator, int], daemons: list[Daemon]
) -> None:
    """tck-id-operational-behavior-edge-node-birth-sequence-wait (births wait for the primary
    host's STATE online); tck-id-operational-behavior-primary-application-state-with-
    multiple-servers-state (online false: NDEATH and disconnect; births again, with the
    next bdSeq, once the host is back); readings taken meanwhile are replayed after the
    births, is_historical, with their acquisition timestamps."""
    _, port = device
    state = "spBv1.0/STATE/scada"
    with mosquitto(tmp_path) as broker:
        metrics_port = free_port()
        config = write_config(tmp_path, broker.port, port, primary_host_id="scada",
                              metrics_port=metrics_port)
        async with recording(broker.port, f"{NS}/#") as rec:
            daemon = start(daemons, config)
            await until(lambda: daemon.running()
                        and bool(log_events(daemon, "sparkplug: waiting for the primary host")),
                        what=lambda: f"the node waiting for the host; its log:\n{daemon.output()}")
            await until(lambda: bool(log_events(daemon, "device online")), what="polling")
            assert not rec.payloads(NBIRTH)
            t0 = ps.get_current_timestamp()
            await send(broker.port, state, json.dumps({"online": True, "timestamp": t0}).encode(),
                       retain=True)
            await rec.wait_for(lambda: rec.payloads(dtopic("DDATA")))
            first_bd = bd_seq(ps.NBirth.decode(rec.payloads(NBIRTH)[0]).metrics)
            await send(broker.port, state,
                       json.dumps({"online": False, "timestamp": t0 + 1}).encode(), retain=True)
            await rec.wait_for(lambda: rec.payloads(NDEATH))
            assert ps.NDeath.decode(rec.payloads(NDEATH)[0]).bd_seq_metric.value == first_bd
            offline_at = ps.get_current_timestamp()
            await until(lambda: len(log_events(daemon, "sparkplug: waiting for the primary host"))
                        == 2, what="a reconnect, waiting for the host")
            at = await polls(metrics_port)
            await until(lambda: polled(metrics_port, at + 5, daemon),
                        what="polls while the host is away")
            assert len(rec.payloads(NBIRTH)) == 1
            await send(broker.port, state,
                       json.dumps({"online": True, "timestamp": t0 + 2}).encode(), retain=True)
            await rec.wait_for(lambda: len(rec.payloads(NBIRTH)) == 2)
            second = ps.NBirth.decode(rec.payloads(NBIRTH)[1])
            assert bd_seq(second.metrics) == (first_bd + 1) % 256
            await rec.wait_for(lambda: any(m.is_historical for d in ddata(rec) for m in d.metrics))
            historical = [m for d in ddata(rec) for m in d.metrics if m.is_historical]
            assert historical
            assert all(m.timestamp is not None and m.timestamp >= offline_at - 1000
                       for m in historical)
            assert seqs_are_continuous(rec) > 0
            await send(broker.port, state, b"", retain=True)  # leave the broker clean


async def test_broker_outage_replayed_as_historical_after_the_births(
    tmp_path: Path, device: tuple[Simulator, int], daemons: list[Daemon]
) -> None:
    """Readings taken while the broker is away are buffered and replayed after the next
    NBIRTH and DBIRTH with is_historical set and their acquisition timestamps
    (tck-id-payloads-metric-historical); the live ones are not historical."""
    _, port = device
    broker_port, metrics_port = await persistent_session(tmp_path, "sp-rec"), free_port()
    config = write_config(tmp_path, broker_port, port, metrics_port=metrics_port)
    with mosquitto(tmp_path, QUEUE_QOS0, port=broker_port):
        async with recording(broker_port, f"{NS}/#", session="sp-rec") as rec:
            daemon = start(daemons, config)
            await rec.wait_for(lambda: rec.payloads(dtopic("DDATA")))
    outage_start = ps.get_current_timestamp()
    at = await polls(metrics_port)
    await until(lambda: polled(metrics_port, at + 10, daemon), what="polls with no broker")
    outage_end = ps.get_current_timestamp()
    with mosquitto(tmp_path, QUEUE_QOS0, port=broker_port):
        async with recording(broker_port, f"{NS}/#", session="sp-rec") as rec:
            await rec.wait_for(lambda: rec.payloads(NBIRTH))
            await rec.wait_for(
                lambda: any(m.is_historical and m.timestamp is not None
                            and m.timestamp > outage_end - 300
                            for d in ddata(rec) for m in d.metrics)
                and any(not m.is_historical for d in ddata(rec) for m in d.metrics))
            order = [kind(t) for t, _ in node_messages(rec)]
            # (mosquitto may deliver the first connection's will first: an NDEATH)
            assert order[order.index("NBIRTH"):][:2] == ["NBIRTH", "DBIRTH"]
            assert "DDATA" not in order[:order.index("NBIRTH")]
            stamps = [m.timestamp or 0 for d in ddata(rec) for m in d.metrics if m.is_historical]
            assert stamps == sorted(stamps)  # replayed in order
            assert sum(1 for s in stamps if outage_start <= s <= outage_end) >= 5
            assert seqs_are_continuous(rec) > 0
            daemon.signal(signal.SIGTERM)
            assert daemon.wait() == 0


async def test_a_reload_during_an_outage_keeps_every_buffered_reading_on_its_metric(
    tmp_path: Path, device: tuple[Simulator, int], daemons: list[Daemon]
) -> None:
    """Points added before others and one removed while readings wait in the buffer: every
    alias keeps its metric (the node saves them in its state dir), so the replayed readings
    decode against the new DBIRTHs as what they were (tck-id-payloads-alias-uniqueness;
    tck-id-payloads-metric-historical), and the removed point's values are left out."""
    _, port = device
    broker_port, metrics_port = await persistent_session(tmp_path, "sp-reload"), free_port()
    config = write_config(tmp_path, broker_port, port, extra_device=True,
                          metrics_port=metrics_port)
    with mosquitto(tmp_path, QUEUE_QOS0, port=broker_port):
        async with recording(broker_port, f"{NS}/#", session="sp-reload") as rec:
            daemon = start(daemons, config)
            await rec.wait_for(lambda: rec.payloads(dtopic("DDATA", "meter2")))
    at = await polls(metrics_port)
    await until(lambda: polled(metrics_port, at + 5, daemon), what="polls with no broker")
    # Two points first (in config order they would take every later alias), `delta` gone.
    doc = yaml.safe_load(config.read_text())
    doc["devices"][0]["points"] = [
        {"name": "volts_again", "address": 0, "type": "float32"},
        {"name": "temp_raw", "address": 2, "type": "int16"},
        *(p for p in POINTS if p["name"] != "delta"),
    ]
    config.write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
    reloaded = ps.get_current_timestamp()
    daemon.signal(signal.SIGHUP)
    await until(lambda: daemon.running() and bool(log_events(daemon, "reloaded")),
                what="the reload")
    at = await polls(metrics_port)
    await until(lambda: polled(metrics_port, at + 5, daemon), what="polls after the reload")
    with mosquitto(tmp_path, QUEUE_QOS0, port=broker_port):
        async with recording(broker_port, f"{NS}/#", session="sp-reload") as rec:
            def replayed(name: str) -> list[ps.DData]:
                return [d for d in ddata(rec, name) if any(m.is_historical for m in d.metrics)]

            await rec.wait_for(lambda: any(
                m.timestamp is not None and m.timestamp > reloaded
                for d in replayed("meter2") for m in d.metrics))
            before = [d for d in replayed("meter2")
                      if all((m.timestamp or 0) < reloaded for m in d.metrics)]
            assert before, "no reading from before the reload was replayed"
            assert all(values(d) == {"voltage": 1.5} for d in replayed("meter2"))
            meter = [values(d) for d in replayed("meter")]
            assert meter
            assert all("delta" not in v for v in meter)
            assert any(v.get("voltage") == VALUES["voltage"] and "volts_again" not in v
                       for v in meter)  # read before the reload: the old points only
            daemon.signal(signal.SIGTERM)
            assert daemon.wait() == 0


async def test_over_mqtt_3_1_1(
    tmp_path: Path, device: tuple[Simulator, int], daemons: list[Daemon]
) -> None:
    """The edge node on an MQTT 3.1.1 session (`protocol: 3.1.1`; aiomqtt under the session,
    where MQTT 5 uses our wire client): births and DDATA decode, seq runs on, and the NDEATH
    will carries the NBIRTH's bdSeq after `kill -9` (tck-id-payloads-ndeath-will-message,
    tck-id-payloads-ndeath-bdseq)."""
    _, port = device
    with mosquitto(tmp_path) as broker:
        config = write_config(tmp_path, broker.port, port)
        doc = yaml.safe_load(config.read_text())
        doc["mqtt"]["protocol"] = "3.1.1"
        config.write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
        async with recording(broker.port, f"{NS}/#") as rec:
            daemon = start(daemons, config)
            await until(lambda: len(ddata(rec)) >= 3,
                        what=lambda: f"3 DDATA; log:\n{daemon.output()}")
            assert [e["protocol"] for e in daemon.events("broker connected")] == ["3.1.1"]
            [nbirth] = [ps.NBirth.decode(p) for p in rec.payloads(NBIRTH)]
            [dbirth] = births(rec, dtopic("DBIRTH"))
            assert {m.name for m in dbirth.metrics} == set(VALUES)
            assert values(ddata(rec)[-1])["voltage"] == pytest.approx(230.5)
            assert seqs_are_continuous(rec) >= 3
            daemon.signal(signal.SIGKILL)
            daemon.wait()
            await rec.wait_for(lambda: rec.payloads(NDEATH))
            [will] = [ps.NDeath.decode(p) for p in rec.payloads(NDEATH)]
            assert will.bd_seq_metric.value == bd_seq(nbirth.metrics)
