"""The pipeline in one process: transport recovery, buffering across a broker outage."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from bridge.config import Config, load_config
from bridge.errors import DeviceError, TransportError
from bridge.service import Service
from bridge.sim.tcp import Simulator
from bridge.transports.modbus import Endpoint, ModbusClient
from tests.helpers import WAIT, free_port, mosquitto, recording, until

pytestmark = pytest.mark.integration  # starts processes or socket servers


def make_config(tmp_path: Path, broker: int, device: int, **mqtt: Any) -> Config:
    path = tmp_path / "bridge.yaml"
    path.write_text(yaml.safe_dump({
        "version": 1,
        "gateway": {"id": "pipe", "state_dir": str(tmp_path / "state")},
        "mqtt": {"host": "127.0.0.1", "port": broker, **mqtt},
        "links": [{"name": "plc", "type": "tcp", "host": "127.0.0.1", "port": device,
                   "timeout": "300ms"}],
        "devices": [{"name": "dev", "link": "plc", "unit": 1, "interval": "100ms",
                     "points": [{"name": "counter", "address": 0, "type": "uint32"}]}],
    }))
    return load_config(path)


async def test_link_reconnects_after_device_restart(tmp_path: Path) -> None:
    """A device that goes away and comes back is read again without a new client."""
    port = free_port()
    config = make_config(tmp_path, 1883, port)
    client = ModbusClient(Endpoint("tcp", "127.0.0.1", port, 0.3), backoff_cap=0.2)
    sim = Simulator(config)
    await sim.start()
    sim.set_value("dev", "counter", 7)
    assert await client.read(1, "holding", 0, 2) == [0, 7]
    await sim.stop()
    with pytest.raises((TransportError, DeviceError)):
        await client.read(1, "holding", 0, 2)
    sim = Simulator(config)
    await sim.start()
    sim.set_value("dev", "counter", 8)

    async def reads_again() -> bool:
        try:
            return await client.read(1, "holding", 0, 2) == [0, 8]
        except (TransportError, DeviceError):
            return False

    try:
        await until(reads_again, what="the link to recover", every=0.1)
    finally:
        client.close()
        await sim.stop()


# The recorder's persistent session gets QoS 0 messages queued too, as QoS 1 ones.
QUEUE_QOS0 = "queue_qos0_messages true\n"


@dataclass
class Running:
    """A Service running in this loop beside its simulated device."""

    sim: Simulator
    service: Service
    stop: asyncio.Event
    run: asyncio.Task[None]

    async def stop_cleanly(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.run, WAIT)


@contextlib.asynccontextmanager
async def running(config: Config) -> AsyncIterator[Running]:
    sim = Simulator(config)
    await sim.start()
    service = Service(config)
    stop = asyncio.Event()
    run = asyncio.create_task(service.run(stop=stop, grace=5))
    try:
        yield Running(sim, service, stop, run)
    finally:
        stop.set()
        await sim.stop()
        if not run.done():
            run.cancel()


@pytest.mark.parametrize("qos", [1, 0])
async def test_readings_taken_while_broker_is_down_arrive_later_in_order(
    tmp_path: Path, qos: int
) -> None:
    """Polling goes on with no broker; once it is up, every reading taken meanwhile arrives,
    in order, with the time it was taken. At QoS 0 too, though live QoS 0 polls are held in
    memory rather than stored (bridge.buffer.held): without a broker they are stored."""
    broker_port, device_port = free_port(), free_port()
    topic = "m2m/pipe/dev/counter"
    with mosquitto(tmp_path, QUEUE_QOS0, port=broker_port):  # a persistent subscriber session
        async with recording(broker_port, topic, session="rec"):
            pass
    config = make_config(tmp_path, broker_port, device_port, qos=qos)
    async with running(config) as bridge:
        service = bridge.service
        for n in range(1, 6):  # five distinct values while the broker is down
            bridge.sim.set_value("dev", "counter", n)
            # Two more readings: the second was polled after the value was set.
            taken = service.buffer.accepted + 2

            def polled(target: int = taken) -> bool:
                return service.buffer.accepted >= target

            await until(polled, what=f"a poll of {n}")
        down_until = time.time_ns() // 1_000_000
        assert service.buffer.accepted >= 5
        with mosquitto(tmp_path, QUEUE_QOS0, port=broker_port):
            await asyncio.wait_for(service.publisher.connected.wait(), 30)
            connected_at = time.time_ns() // 1_000_000
            async with recording(broker_port, topic, session="rec") as rec:
                await rec.wait_for(lambda: any(v["ts"] > down_until for v in rec.values(topic)))
            await bridge.stop_cleanly()
    readings = rec.values(topic)
    # Live readings go out ahead of the backlog (README, "Store and forward"), so order is
    # promised within each: the backlog (everything stored before the connection came up)
    # oldest first, live readings as taken. Readings from the moments around the connect may
    # be either, so each side is judged on what is certainly in it.
    backlog = [r["ts"] for r in readings if r["ts"] <= down_until]
    live = [r["ts"] for r in readings if r["ts"] > connected_at + 1000]
    assert backlog == sorted(backlog), "backlog replayed out of order"
    assert live == sorted(live), "live readings out of order"
    taken_offline = [r["value"] for r in readings if r["ts"] <= down_until]
    assert sorted(set(taken_offline)) == [1, 2, 3, 4, 5], (down_until, readings[:5])


async def test_live_qos0_readings_never_touch_the_disk_and_a_lost_broker_keeps_them(
    tmp_path: Path,
) -> None:
    """While the broker is connected, QoS 0 polls go out without a row on the disk (no SQLite
    write per poll on an SD card); once it is gone, what is polled is stored, and arrives when
    it is back."""
    broker_port, device_port = free_port(), free_port()
    topic = "m2m/pipe/dev/counter"
    config = make_config(tmp_path, broker_port, device_port, qos=0)
    db = tmp_path / "state" / "buffer.sqlite3"
    async with running(config) as bridge:
        with mosquitto(tmp_path, QUEUE_QOS0, port=broker_port):
            async with recording(broker_port, topic, session="rec") as rec:
                await asyncio.wait_for(bridge.service.publisher.connected.wait(), WAIT)
                bridge.sim.set_value("dev", "counter", 1)
                await rec.wait_for(lambda: 1 in [v["value"] for v in rec.values(topic)])
                before = rows_written(db)  # polls before the connection: stored
                await rec.wait_for(
                    lambda: [v["value"] for v in rec.values(topic)].count(1) >= 20)
            assert rows_written(db) == before
        bridge.sim.set_value("dev", "counter", 2)  # polled with no broker: stored

        def stored() -> bool:
            return rows_written(db) >= before + 5

        await until(stored, what="readings stored while the broker is gone")
        with mosquitto(tmp_path, QUEUE_QOS0, port=broker_port):
            async with recording(broker_port, topic, session="rec") as rec:
                await rec.wait_for(
                    lambda: [v["value"] for v in rec.values(topic)].count(2) >= 5)
            await bridge.stop_cleanly()


def rows_written(db: Path) -> int:
    """Rows ever written to the buffer (AUTOINCREMENT's high-water mark: also those deleted)."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'batches'").fetchone()
    return 0 if row is None else int(row[0])


async def test_replayed_backlog_never_becomes_the_retained_value(tmp_path: Path) -> None:
    """With retain on, a reading taken live stays the retained one while older readings from
    the backlog are replayed after it."""
    from bridge.buffer import DiskBuffer
    from bridge.config import BufferSettings, MqttSettings
    from bridge.core.messages import Message
    from bridge.mqtt.publisher import Publisher

    topic = "m2m/ret/dev/v"
    buffer = DiskBuffer(tmp_path / "b.sqlite3", max_messages=10_000, max_bytes=10**8,
                        max_age=86400)
    now = time.time_ns() // 1_000_000
    # 600 readings from the outage, polls of 100: more than one burst, so replay is still
    # going on below.
    for first in range(0, 600, 100):
        buffer.put([Message(topic, str(n).encode(), 1, True, now - 600 + n)
                    for n in range(first, first + 100)])
    with mosquitto(tmp_path) as broker:
        settings = MqttSettings(host="127.0.0.1", port=broker.port, client_id="ret",
                                topic_prefix="m2m/ret", buffer=BufferSettings(replay_rate=200))
        publisher = Publisher(settings, buffer)
        running = asyncio.create_task(publisher.run())
        await asyncio.wait_for(publisher.connected.wait(), 10)
        buffer.put([Message(topic, b"999", 1, True, now + 1)])  # live, newest
        await until(lambda: len(buffer) == 0, what="the backlog to be delivered")
        publisher.stop()
        await asyncio.wait_for(running, WAIT)
        async with recording(broker.port, topic) as rec:
            await rec.wait_for(lambda: rec.payloads(topic))
        assert rec.messages[0][1:] == (b"999", True)
    buffer.close()
