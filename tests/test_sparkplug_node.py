"""The Sparkplug edge node's state machine (bridge.mqtt.sparkplug) against a fake broker
(tests/fakewire.py): no broker, process or socket. Payloads are decoded with pysparkplug."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pysparkplug as ps
import pytest
import structlog
from pysparkplug import _protobuf as tahu

import bridge.mqtt.connection
from bridge.buffer import DiskBuffer
from bridge.config import Config, Device, Point, load_config
from bridge.core import sparkplug as sp
from bridge.core.outbox import Outbox
from bridge.core.sparkplug import NodeMetrics
from bridge.core.sparkplug_stored import DeviceData, historical, known
from bridge.mqtt.publisher import Publisher
from bridge.mqtt.sparkplug import ALIASES_FILE, BD_SEQ_FILE, AliasBook, BdSeq, EdgeNode
from bridge.mqtt.wireevents import Incoming
from tests.fakewire import FakeBroker, eventually, running

NS = "spBv1.0/g1"
NBIRTH, NDEATH = f"{NS}/NBIRTH/n1", f"{NS}/NDEATH/n1"
DBIRTH, DDATA, DDEATH = f"{NS}/DBIRTH/n1/meter", f"{NS}/DDATA/n1/meter", f"{NS}/DDEATH/n1/meter"


def make_config(tmp_path: Path, **sparkplug: str) -> Config:
    block = ", ".join(f"{k}: {v}" for k, v in {"group_id": "g1", "edge_node_id": "n1",
                                                   **sparkplug}.items())
    path = tmp_path / "bridge.yaml"
    path.write_text(
        "version: 1\n"
        f"gateway: {{id: gw, state_dir: {tmp_path / 'state'}}}\n"
        f"mqtt: {{host: broker.test, format: sparkplug, sparkplug: {{{block}}}}}\n"
        "links: [{name: plc, type: tcp, host: 127.0.0.1, port: 1502}]\n"
        "devices:\n"
        "  - {name: other, link: plc, unit: 2, points: [{name: x, address: 0}]}\n"
        "  - name: meter\n    link: plc\n    unit: 1\n    points:\n"
        "      - {name: v, address: 0, type: float32, unit: V}\n"
        "      - {name: sp, address: 2, writable: true, max: 100}\n"
    )
    return load_config(path, environ={}, check_state_dir=True)


class Node:
    """An edge node, its publisher on a fake broker, and the meter's outbox."""

    def __init__(self, config: Config, buffer: DiskBuffer) -> None:
        metrics = NodeMetrics(config.devices)
        self.outbox = Outbox(config.device("meter"), config.mqtt)
        self.outbox.use_metrics(metrics.device("meter"))
        self.writes: list[tuple[str, str, object]] = []
        self.refused: list[str] = []
        self.node = EdgeNode(config, data=self._data, writes=lambda: self)
        self.buffer = buffer
        self.publisher = Publisher(config.mqtt, buffer, subscriptions=self.node.subscriptions,
                                   on_message=self._on_message, node=self.node)

    def _on_message(self, message: Incoming) -> None:
        self.node.on_message(message)

    def _data(self, device: str) -> DeviceData | None:
        return self.outbox.sparkplug if device == "meter" else None

    def write(self, source: str, device: str, point: str, value: object) -> None:
        self.writes.append((device, point, value))

    def refuse(self, source: str, metric: str, reason: str) -> None:
        self.refused.append(reason)

    def poll(self, value: float) -> None:
        ts = time.time_ns() // 1_000_000
        self.buffer.put(self.outbox.messages({"v": value, "sp": 5}, ts, time.monotonic()))


@pytest.fixture
def broker(monkeypatch: pytest.MonkeyPatch) -> FakeBroker:
    monkeypatch.setattr(bridge.mqtt.connection, "RECONNECT_BASE", 0.0)
    return FakeBroker(batch=10).install(monkeypatch)


@pytest.fixture
def buffer(tmp_path: Path) -> Iterator[DiskBuffer]:
    buf = DiskBuffer(tmp_path / "buffer.sqlite3", max_messages=1000, max_bytes=10**7,
                     max_age=86400)
    yield buf
    buf.close()


def kinds(broker: FakeBroker, connection: int | None = None) -> list[str]:
    return [p.topic.split("/")[2] for p in broker.published
            if connection is None or p.connection == connection]


def seqs(broker: FakeBroker) -> list[int]:
    return [tahu.Payload.FromString(p.payload).seq for p in broker.published
            if "NDEATH" not in p.topic]


def will(broker: FakeBroker, index: int) -> tuple[str, bytes, int, bool]:
    """The will of connect `index` (the fake broker records what open_session was given)."""
    found: object = broker.wills[index]
    assert isinstance(found, tuple)
    return found


# --- bdSeq ------------------------------------------------------------------------------------


def test_bdseq_starts_at_0_rises_survives_a_restart_and_wraps(tmp_path: Path) -> None:
    """tck-id-message-flow-edge-node-birth-publish-will-message-payload-bdSeq: one more per
    connect, from the state dir after a restart, 255 wraps to 0."""
    path = tmp_path / BD_SEQ_FILE
    store = BdSeq(path)
    assert [store.next(), store.next()] == [0, 1]
    assert BdSeq(path).next() == 2  # a new process reads the file
    path.write_text("255\n")
    assert BdSeq(path).next() == 0
    path.write_text("garbage")
    assert BdSeq(path).next() == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [BD_SEQ_FILE]  # no temp file left


def devices(layout: dict[str, list[tuple[str, str]]]) -> list[Device]:
    """Devices of (point, type) lists, four registers apart."""
    return [
        Device(name=name, link="plc", points=[
            Point.model_validate({"name": point, "address": i * 4, "type": kind})
            for i, (point, kind) in enumerate(points)
        ])
        for name, points in layout.items()
    ]


def aliases(metrics: NodeMetrics) -> dict[str, int]:
    return {f"{d.name}.{m.name}": m.alias for d in metrics.devices.values() for m in d.metrics}


def test_aliases_stay_with_their_metrics_across_config_changes_and_restarts(
    tmp_path: Path,
) -> None:
    """A point added before others, one removed, one retyped: no alias moves to another
    metric, in this process or the next (readings buffered before still name their own)."""
    path = tmp_path / ALIASES_FILE
    book = AliasBook(path)
    first = book.metrics(devices({"a": [("x", "uint16"), ("y", "uint16")],
                                  "b": [("v", "float32")]}))
    assert aliases(first) == {"a.x": 1, "a.y": 2, "b.v": 3}  # config order the first time
    changed = devices({"a": [("new", "uint16"), ("x", "uint16")],  # y gone, new first
                       "b": [("v", "int32")]})  # retyped: another metric
    second = book.metrics(changed)
    assert aliases(second) == {"a.new": 4, "a.x": 1, "b.v": 5}
    assert aliases(AliasBook(path).metrics(changed)) == aliases(second)  # a restart
    back = AliasBook(path).metrics(devices({"a": [("y", "uint16")]}))
    assert aliases(back) == {"a.y": 2}  # put back: its own alias again
    assert sorted(p.name for p in tmp_path.iterdir()) == [ALIASES_FILE]  # no temp file left


def test_an_unreadable_or_unwritable_alias_file_is_one_warning(tmp_path: Path) -> None:
    layout = devices({"a": [("x", "uint16")]})
    path = tmp_path / ALIASES_FILE
    path.write_text("{not json")
    with structlog.testing.capture_logs() as logs:
        assert aliases(AliasBook(path).metrics(layout)) == {"a.x": 1}
    assert [e["event"] for e in logs] == ["sparkplug aliases unreadable, numbering from 1 again"]
    book = AliasBook(tmp_path / "missing-dir" / ALIASES_FILE)
    with structlog.testing.capture_logs() as logs:
        book.metrics(layout)
        assert aliases(book.metrics(devices({"a": [("x", "uint16"), ("y", "int16")]}))) == {
            "a.x": 1, "a.y": 2}  # numbered on in memory
    assert [e["event"] for e in logs] == ["sparkplug aliases not saved"]


def test_replayed_and_late_readings_keep_only_the_metrics_still_born(tmp_path: Path) -> None:
    """A reading stored before a reload removed one of its points goes out without it (the
    DBIRTH no longer names its alias), historical or live; with none left, not at all."""
    book = AliasBook(tmp_path / ALIASES_FILE)
    before = book.metrics(devices({"m": [("a", "uint16"), ("b", "uint16")]}))
    device = before.device("m")
    assert device is not None
    stored = sp.ddata(device, {"a": 1, "b": 2}, acquired=5, seq=None, ts=5)
    only_b = sp.ddata(device, {"b": 2}, acquired=5, seq=None, ts=5)
    after = book.metrics(devices({"m": [("a", "uint16")]})).device("m")
    assert after is not None
    kept = tahu.Payload.FromString(historical(stored, after.by_alias) or b"")
    assert [(m.alias, m.int_value, m.is_historical) for m in kept.metrics] == [(1, 1, True)]
    assert historical(only_b, after.by_alias) is None
    late = tahu.Payload.FromString(known(stored, after.by_alias) or b"")
    assert [(m.alias, m.int_value, m.is_historical) for m in late.metrics] == [(1, 1, False)]
    assert known(stored, device.by_alias) == stored  # nothing to drop: the same bytes


# --- the publisher with an edge node ----------------------------------------------------------


async def test_will_births_data_deaths_and_a_reconnect(
    tmp_path: Path, broker: FakeBroker, buffer: DiskBuffer
) -> None:
    """The will is NDEATH (QoS 1, not retained) with a new bdSeq per connect; NBIRTH (seq 0)
    and the online device's DBIRTH come before its DDATA, which is numbered on; offline is
    DDEATH; a new connection births again; a clean stop publishes DDEATH and NDEATH."""
    config = make_config(tmp_path)
    n = Node(config, buffer)
    n.poll(230.0)
    n.publisher.set_status("meter", True)
    async with running(n.publisher):
        await eventually(lambda: DDATA in [p.topic for p in broker.published])
        assert kinds(broker) == ["NBIRTH", "DBIRTH", "DDATA"]
        assert broker.subscriptions[0][1] == (f"{NS}/NCMD/n1", f"{NS}/DCMD/n1/+")
        assert seqs(broker) == [0, 1, 2]
        topic, payload, qos, retain = will(broker, 0)
        assert (topic, qos, retain) == (NDEATH, 1, False)
        assert ps.NDeath.decode(payload).bd_seq_metric.value == 0
        birth = ps.DBirth.decode(broker.published[1].payload)
        assert {m.name: m.value for m in birth.metrics} == {"v": 230.0, "sp": 5}
        n.publisher.set_status("meter", False)
        await eventually(lambda: kinds(broker)[-1] == "DDEATH")
        assert seqs(broker)[-1] == 3
        n.publisher.set_status("meter", True)
        await eventually(lambda: kinds(broker)[-1] == "DBIRTH")
        broker.drop()
        await eventually(lambda: broker.connects == 2 and "DBIRTH" in kinds(broker, 2))
        assert kinds(broker, 2) == ["NBIRTH", "DBIRTH"]
        assert ps.NDeath.decode(will(broker, 1)[1]).bd_seq_metric.value == 1
        assert ps.NBirth.decode(broker.published[-2].payload).seq == 0
    assert kinds(broker, 2)[-1] == "NDEATH"
    assert ps.NDeath.decode(broker.published[-1].payload).bd_seq_metric.value == 1
    assert (tmp_path / "state" / BD_SEQ_FILE).read_text().strip() == "1"


async def test_a_reading_of_an_offline_device_is_born_stale_and_dies_again(
    tmp_path: Path, broker: FakeBroker, buffer: DiskBuffer
) -> None:
    """A DDATA never goes out for a device without a DBIRTH: a device read but not online
    gets one first, its values Quality 500 (stale), and DDEATH after; seq wraps 255 -> 0."""
    config = make_config(tmp_path)
    n = Node(config, buffer)
    async with running(n.publisher):
        await eventually(lambda: kinds(broker) == ["NBIRTH"])
        n.node.seq = 254
        n.poll(1.0)
        await eventually(lambda: len(kinds(broker)) == 4)
    assert kinds(broker)[:4] == ["NBIRTH", "DBIRTH", "DDATA", "DDEATH"]
    assert seqs(broker)[:4] == [0, 255, 0, 1]
    raw = tahu.Payload.FromString(broker.published[1].payload).metrics[0]
    props = dict(zip(raw.properties.keys, raw.properties.values, strict=True))
    assert props["Quality"].int_value == 500


async def test_rebirth_dcmd_and_bad_commands(
    tmp_path: Path, broker: FakeBroker, buffer: DiskBuffer
) -> None:
    """NCMD rebirth: NBIRTH (same bdSeq, seq 0) and DBIRTH again on the same connection;
    a DCMD's checked writes go to the command path, refusals are counted there."""
    config = make_config(tmp_path)
    n = Node(config, buffer)
    n.poll(2.0)
    n.publisher.set_status("meter", True)
    async with running(n.publisher):
        await eventually(lambda: "DDATA" in kinds(broker))
        rebirth = ps.NCmd(timestamp=1, metrics=(ps.Metric(
            timestamp=1, name="Node Control/Rebirth", datatype=ps.DataType.BOOLEAN,
            value=True),)).encode()
        broker.send(Incoming(f"{NS}/NCMD/n1", rebirth, None, None, False))
        await eventually(lambda: kinds(broker).count("NBIRTH") == 2)
        await eventually(lambda: kinds(broker)[-1] == "DBIRTH")
        assert broker.connects == 1
        assert ps.NBirth.decode(broker.published[-2].payload).seq == 0
        dcmd = ps.DCmd(timestamp=1, metrics=(
            ps.Metric(timestamp=1, name="sp", datatype=ps.DataType.UINT16, value=42),
            ps.Metric(timestamp=1, name="sp", datatype=ps.DataType.UINT16, value=101),
            ps.Metric(timestamp=1, name="v", datatype=ps.DataType.FLOAT, value=1.0),
        )).encode()
        broker.send(Incoming(f"{NS}/DCMD/n1/meter", dcmd, None, None, False))
        broker.send(Incoming(f"{NS}/DCMD/n1/meter", b"junk", None, None, False))
        await eventually(lambda: len(n.refused) == 3)
        assert n.writes == [("meter", "sp", 42)]


def test_state_of_the_primary_host(tmp_path: Path) -> None:
    """Births wait for `online: true`; an older STATE than the last is ignored; `online:
    false` after the births means leaving (NDEATH, disconnect); junk is ignored."""
    config = make_config(tmp_path, primary_host_id="scada")
    node = EdgeNode(config, data=lambda _: None, writes=lambda: None)  # type: ignore[arg-type,return-value]
    assert "spBv1.0/STATE/scada" in node.subscriptions
    assert not node.host_online

    def state(online: bool, ts: int) -> Incoming:
        payload = json.dumps({"online": online, "timestamp": ts}).encode()
        return Incoming("spBv1.0/STATE/scada", payload, None, None, True)

    assert node.on_message(state(True, 10))
    assert node.host_online
    node.on_message(state(False, 5))  # older: ignored
    assert node.host_online
    node.on_message(Incoming("spBv1.0/STATE/scada", b"{", None, None, False))
    assert node.host_online
    node.node_born = True
    node.on_message(state(False, 11))
    assert (node.host_online, node.leaving) == (False, True)
    assert not node.on_message(Incoming("m2m/gw/x/y/set", b"1", None, None, False))
