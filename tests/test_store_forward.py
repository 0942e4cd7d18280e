"""Nothing lost: broker outages, kill -9, buffer bounds, device restarts (daemon as a process)."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import yaml

from bridge.sim.tcp import Simulator
from tests.helpers import (
    Daemon,
    Recorder,
    free_port,
    metrics,
    mosquitto,
    recording,
    simulated,
    until,
)

pytestmark = pytest.mark.integration  # starts processes or socket servers

PREFIX = "m2m/sf"
# The recorder's offline session keeps everything, QoS 0 messages too.
QUEUE = "max_queued_messages 100000\nqueue_qos0_messages true\n"


def write_config(tmp_path: Path, broker: int, device: int, **extra: Any) -> Path:
    points = [{"name": "a", "address": 0, "type": "uint32"},
              {"name": "b", "address": 2, "type": "uint16"}]
    doc: dict[str, Any] = {
        "version": 1,
        "gateway": {"id": "sf", "state_dir": str(tmp_path / "state")},
        "mqtt": {"host": "127.0.0.1", "port": broker, "qos": extra.pop("qos", 1),
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
    async with simulated(write_config(tmp_path, 1, port)) as sim:
        yield sim, port


async def count_up(sim: Simulator, stop: asyncio.Event) -> None:
    """Point `a` counts up every 50 ms, so every poll reads a new value."""
    n = 0
    while not stop.is_set():
        n += 1
        sim.set_value("dev", "a", n)
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("qos", [1, 0])
async def test_outage_and_kill_9_lose_nothing(
    tmp_path: Path, device: tuple[Simulator, int], qos: int
) -> None:
    """Broker down with the daemon kill -9'd and restarted meanwhile: every reading arrives,
    with its original ts, the backlog in order per point. At QoS 0 too: the polls held in
    memory while the broker was up (bridge.buffer.held) are written when it goes, and what is
    polled without it is stored as at QoS 1."""
    sim, port = device
    broker_port, metrics_port = free_port(), free_port()
    topic = f"{PREFIX}/dev/a"
    with mosquitto(tmp_path, QUEUE, port=broker_port):
        async with recording(broker_port, f"{PREFIX}/#", session="rec"):
            pass  # a persistent session: the broker keeps what arrives while it is away
    # Both daemons serve metrics on one port (one at a time): the test waits on their counters.
    config = write_config(tmp_path, broker_port, port, qos=qos,
                          metrics={"host": "127.0.0.1", "port": metrics_port})
    stop = asyncio.Event()
    counter = asyncio.create_task(count_up(sim, stop))
    first, second = Daemon(config), Daemon(config)
    try:
        with mosquitto(tmp_path, QUEUE, port=broker_port):
            first.start()
            await first.ready()
            await until(lambda: published(metrics_port, 4), what="readings delivered")
        outage_start = time.time_ns() // 1_000_000  # broker stopped here
        at_outage = await polls(metrics_port)
        # 18 polls while the broker is away (3.6 s at 5 a second), then kill -9.
        await until(lambda: polled(metrics_port, at_outage + 18, first),
                    what="18 polls with the broker down")
        first.running()  # the broker going away is no crash
        first.signal(signal.SIGKILL)
        first.wait()
        killed_at = time.time_ns() // 1_000_000
        await asyncio.sleep(1)  # pacing: a second with no daemon (its readings are excluded)
        second.start()
        await second.ready()
        await until(lambda: polled(metrics_port, 10, second), what="10 polls by the restart")
        restarted = time.time_ns() // 1_000_000
        with mosquitto(tmp_path, QUEUE, port=broker_port):
            async with recording(broker_port, f"{PREFIX}/#", session="rec") as rec:
                await rec.wait_for(
                    lambda: any(v["ts"] > restarted + 1000 for v in rec.values(topic))
                )
                # A clean stop flushes what is left; a marker published after it arrives
                # after every reading the broker took from the daemon (one session queue).
                second.signal(signal.SIGTERM)
                assert await asyncio.to_thread(second.wait) == 0, second.output()
                assert [e["left_in_buffer"] for e in second.events("bridge stopped")] == [0]
                await mark(broker_port, rec)
    finally:
        stop.set()
        await counter
        first.stop()
        second.stop()
    assert_nothing_lost(rec.values(topic), outage_start, killed_at, restarted)


def assert_nothing_lost(
    readings: list[dict[str, Any]], outage_start: int, killed_at: int, restarted: int
) -> None:
    """Each reading once, the backlog in order, no long hole while a daemon ran."""
    stamps = [r["ts"] for r in readings]
    assert len(stamps) == len(set(stamps)), "a reading was delivered twice"
    outage = [r for r in readings if outage_start <= r["ts"] < restarted]
    assert [r["ts"] for r in outage] == sorted(r["ts"] for r in outage), "backlog out of order"
    # Polls every 200 ms: while a daemon ran, no hole of several missing readings (a late
    # poll on a loaded machine makes a short one; a lost batch makes a long one).
    ran = sorted(s for s in stamps if s < killed_at or s > killed_at + 1000)
    holes = [b - a for a, b in itertools.pairwise(ran) if not a < killed_at < b]
    assert max(holes) < 1000, holes
    taken_while_down = [s for s in stamps if outage_start + 500 <= s <= killed_at]
    assert len(taken_while_down) >= 10  # of 15 or more polls in that span, past kill -9
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
        await daemon.ready()
        # 25 or more messages (two points a poll) into a buffer of 20.
        await until(lambda: dropped(metrics_port, 5, daemon), what="5 drops from the buffer")
        found = await metrics(metrics_port)
        assert found["m2m_buffer_messages"] == 20
        assert found["m2m_buffer_dropped_total"] >= 5
        assert found["m2m_mqtt_connected"] == 0
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


async def polls(port: int) -> float:
    """Polls the daemon serving metrics on `port` has started (0 before it serves)."""
    return (await metrics(port)).get('m2m_polls_total{device="dev",link="plc"}', 0.0)


async def polled(port: int, count: float, daemon: Daemon) -> bool:
    daemon.running()
    return await polls(port) >= count


async def published(port: int, count: float) -> bool:
    return (await metrics(port)).get("m2m_published_total", 0.0) >= count


async def dropped(port: int, count: float, daemon: Daemon) -> bool:
    daemon.running()
    return (await metrics(port)).get("m2m_buffer_dropped_total", 0.0) >= count


async def mark(port: int, rec: Recorder) -> None:
    """Publish a marker under PREFIX and wait until `rec` has it: whatever the broker had
    queued for `rec` before it has arrived by then."""
    async with aiomqtt.Client("127.0.0.1", port, identifier="marker") as client:
        await client.publish(f"{PREFIX}/marker", b"end", qos=1)
    await rec.wait_for(lambda: rec.payloads(f"{PREFIX}/marker"))


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
                await rec.wait_for(lambda: rec.last(status) == b"online")
                assert rec.payloads(status) == [b"online", b"offline", b"online"]
                assert daemon.process is not None
                assert daemon.process.poll() is None
        finally:
            daemon.stop()
    log = daemon.output()
    assert log.count('"device offline"') == 1
    assert json.loads(log.splitlines()[0])["level"] in {"info", "warning"}
