"""Nothing lost: broker outages, kill -9, buffer bounds, device restarts (daemon as a process)."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from bridge.config import load_config
from bridge.simulator import Simulator
from tests.helpers import Daemon, free_port, mosquitto, recording

PREFIX = "m2m/sf"
QUEUE = "max_queued_messages 100000\n"  # the recorder's offline session keeps everything


def write_config(tmp_path: Path, broker: int, device: int, **extra: Any) -> Path:
    points = [{"name": "a", "address": 0, "type": "uint32"},
              {"name": "b", "address": 2, "type": "uint16"}]
    doc: dict[str, Any] = {
        "version": 1,
        "gateway": {"id": "sf", "state_dir": str(tmp_path / "state")},
        "mqtt": {"host": "127.0.0.1", "port": broker, "qos": 1,
                 "buffer": extra.pop("buffer", {})},
        "links": [{"name": "plc", "type": "tcp", "host": "127.0.0.1", "port": device,
                   "timeout": "300ms"}],
        "devices": [{"name": "dev", "link": "plc", "unit": 1, "interval": "200ms",
                     "points": points}],
        **extra,
    }
    path = tmp_path / "bridge.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture
async def device(tmp_path: Path) -> AsyncIterator[tuple[Simulator, int]]:
    port = free_port()
    sim = Simulator(load_config(write_config(tmp_path, 1, port)))
    await sim.start()
    try:
        yield sim, port
    finally:
        await sim.stop()


async def count_up(sim: Simulator, stop: asyncio.Event) -> None:
    """Point `a` counts up every 50 ms, so every poll reads a new value."""
    n = 0
    while not stop.is_set():
        n += 1
        sim.set_value("dev", "a", n)
        await asyncio.sleep(0.05)


async def test_outage_and_kill_9_lose_nothing(
    tmp_path: Path, device: tuple[Simulator, int]
) -> None:
    """Broker down 10 s with the daemon kill -9'd and restarted meanwhile: every reading
    arrives, with its original ts, the backlog in order per point."""
    sim, port = device
    broker_port = free_port()
    topic = f"{PREFIX}/dev/a"
    with mosquitto(tmp_path, QUEUE, port=broker_port):
        async with recording(broker_port, f"{PREFIX}/#", session="rec"):
            pass  # a persistent session: the broker keeps what arrives while it is away
    config = write_config(tmp_path, broker_port, port)
    stop = asyncio.Event()
    counter = asyncio.create_task(count_up(sim, stop))
    first, second = Daemon(config), Daemon(config)
    try:
        with mosquitto(tmp_path, QUEUE, port=broker_port):
            first.start()
            await asyncio.sleep(2)
        outage_start = time.time_ns() // 1_000_000  # broker stopped here, for 10 s
        await asyncio.sleep(3)
        assert first.process is not None
        assert first.process.poll() is None, first.output()  # the broker going away is no crash
        first.signal(signal.SIGKILL)
        first.wait()
        killed_at = time.time_ns() // 1_000_000
        await asyncio.sleep(1)
        second.start()
        await asyncio.sleep(6)
        restarted = time.time_ns() // 1_000_000
        with mosquitto(tmp_path, QUEUE, port=broker_port):
            async with recording(broker_port, f"{PREFIX}/#", session="rec") as rec:
                await rec.wait_for(
                    lambda: any(v["ts"] > restarted + 1000 for v in rec.values(topic)), 30
                )
                await asyncio.sleep(1)
    finally:
        stop.set()
        await counter
        first.stop()
        second.stop()
    readings = rec.values(topic)
    stamps = [r["ts"] for r in readings]
    assert len(stamps) == len(set(stamps)), "a reading was delivered twice"
    outage = [r for r in readings if outage_start <= r["ts"] < restarted]
    assert [r["ts"] for r in outage] == sorted(r["ts"] for r in outage), "backlog out of order"
    # Polls every 200 ms: while a daemon ran, no hole longer than a few polls.
    ran = sorted(s for s in stamps if s < killed_at or s > killed_at + 1000)
    holes = [b - a for a, b in itertools.pairwise(ran) if not a < killed_at < b]
    assert max(holes) < 700, holes
    taken_while_down = [s for s in stamps if outage_start + 500 <= s <= killed_at]
    assert len(taken_while_down) >= 10  # ~2.5 s at 5 polls a second survived kill -9
    values = [r["value"] for r in sorted(readings, key=lambda r: r["ts"])]
    assert values == sorted(values)


async def test_full_buffer_drops_the_oldest_and_says_so(
    tmp_path: Path, device: tuple[Simulator, int]
) -> None:
    """With the broker away, a buffer bounded to 20 messages keeps the newest 20, counts the
    drops in metrics and logs once that it is dropping."""
    sim, port = device
    broker_port, metrics_port = free_port(), free_port()
    config = write_config(tmp_path, broker_port, port, buffer={"max_messages": 20},
                          metrics={"host": "127.0.0.1", "port": metrics_port})
    stop = asyncio.Event()
    counter = asyncio.create_task(count_up(sim, stop))
    daemon = Daemon(config)
    try:
        daemon.start()
        await asyncio.sleep(3)  # ~30 messages into a buffer of 20
        metrics = await asyncio.to_thread(_scrape, metrics_port)
        assert float(metrics["m2m_buffer_messages"]) == 20
        assert float(metrics["m2m_buffer_dropped_total"]) >= 5
        assert float(metrics["m2m_mqtt_connected"]) == 0
        stop.set()
        await counter
        last_value = sim.registers("dev", "holding", 0, 2)[1]
        with mosquitto(tmp_path, port=broker_port):
            async with recording(broker_port, f"{PREFIX}/#") as rec:
                await rec.wait_for(
                    lambda: any(v["value"] == last_value for v in rec.values(f"{PREFIX}/dev/a"))
                )
    finally:
        stop.set()
        daemon.stop()
    assert daemon.output().count("buffer full, dropping the oldest messages") == 1


def _scrape(port: int) -> dict[str, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {line.split(" ")[0]: line.split(" ")[1]
            for line in text.splitlines() if line and not line.startswith("#")}


async def test_device_restart_goes_offline_then_online(
    tmp_path: Path, device: tuple[Simulator, int]
) -> None:
    """A device that stops and comes back: status offline, then online, same daemon."""
    sim, port = device
    with mosquitto(tmp_path) as broker:
        config = write_config(tmp_path, broker.port, port)
        daemon = Daemon(config)
        try:
            async with recording(broker.port, f"{PREFIX}/#") as rec:
                daemon.start()
                status = f"{PREFIX}/dev/status"
                await rec.wait_for(lambda: rec.last(status) == b"online")
                await sim.stop()
                await rec.wait_for(lambda: rec.last(status) == b"offline")
                await sim.start()
                await rec.wait_for(lambda: rec.last(status) == b"online", timeout=30)
                assert rec.payloads(status) == [b"online", b"offline", b"online"]
                assert daemon.process is not None
                assert daemon.process.poll() is None
        finally:
            daemon.stop()
    log = daemon.output()
    assert log.count('"device offline"') == 1
    assert json.loads(log.splitlines()[0])["level"] in {"info", "warning"}
