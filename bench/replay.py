"""Replay of a store-and-forward backlog: DiskBuffer put / drain rates, and a drain to mosquitto.

In a temp dir: fills a DiskBuffer with `--messages` (100,000) realistic per-point messages
(`m2m/bench/meter-7/voltage_l1`, `{"value":230.51,"ts":...,"unit":"V"}`) in batches of 100 as
polls would put them, then measures

1. the put rate (messages/s, and CPU µs per message);
2. the store's own drain ceiling: take(500) + ack until empty, no broker;
3. the file size (database + WAL) when full;
4. the replay to a real broker: the same messages put again, then drained by the daemon's own
   Publisher (MQTT 5 wire client, QoS 1) to a private mosquitto on a free 127.0.0.1 port,
   once unpaced (the ceiling) and once at the default replay_rate of 1000 messages/s.

    .venv/bin/python bench/replay.py
    .venv/bin/python bench/replay.py --messages 20000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # bridge, and tests.helpers for the private mosquitto

from bridge.buffer import DiskBuffer  # noqa: E402
from bridge.config import BufferSettings, MqttSettings  # noqa: E402
from bridge.core.messages import Message, point_payload  # noqa: E402
from bridge.mqtt.publisher import Publisher  # noqa: E402

POLL = 100  # messages per put(), as one poll of a device would give
TAKE = 500  # messages per take(): the publisher's batch
POINTS = [("voltage_l1", "V"), ("voltage_l2", "V"), ("voltage_l3", "V"), ("current_l1", "A"),
          ("current_l2", "A"), ("current_l3", "A"), ("power_total", "W"),
          ("energy_import", "kWh"), ("frequency", "Hz"), ("power_factor", None)]


def messages(n: int) -> list[Message]:
    """`n` per-point messages from 10 meters x 10 points, 1 s polls, starting an hour ago."""
    start = int(time.time() * 1000) - 3_600_000
    out = []
    for i in range(n):
        point, unit = POINTS[i % len(POINTS)]
        meter = (i // len(POINTS)) % 10
        ts = start + (i // 100) * 1000 + i % 100
        value = round(230.0 + (i % 997) / 100, 2) if unit == "V" else round(i % 12345 * 1.37, 3)
        topic = f"m2m/bench/meter-{meter}/{point}"
        out.append(Message(topic, point_payload(value, ts, unit, "json"), 1, False, ts))
    return out


def timed(work: Callable[[], None]) -> tuple[float, float]:
    """(wall s, CPU s) of `work()`."""
    wall, cpu = time.perf_counter(), time.process_time()
    work()
    return time.perf_counter() - wall, time.process_time() - cpu


def fill(buffer: DiskBuffer, batch: list[Message]) -> None:
    for i in range(0, len(batch), POLL):
        buffer.put(batch[i : i + POLL])


def drain(buffer: DiskBuffer) -> None:
    while True:
        taken = buffer.take(TAKE)
        if not taken:
            return
        buffer.ack([s.id for s in taken])


def file_sizes(path: Path) -> str:
    """'db X MiB + WAL Y MiB' for the database at `path`."""
    wal = path.with_name(path.name + "-wal")
    db_size, wal_size = path.stat().st_size, wal.stat().st_size if wal.exists() else 0
    return f"{db_size / 2**20:.1f} MiB db + {wal_size / 2**20:.1f} MiB WAL"


def report(label: str, n: int, wall: float, cpu: float) -> None:
    print(f"  {label:<34} {n / wall:>12,.0f} messages/s   {wall:7.2f} s wall   "
          f"{cpu * 1e6 / n:6.1f} µs CPU/message")


async def replay_to_broker(buffer: DiskBuffer, port: int, rate: int) -> tuple[int, float, float]:
    """Drain `buffer` through the daemon's own Publisher (MQTT 5, the default): (messages
    published, wall s, CPU s). Everything stored before it connects is backlog, paced at
    `rate` messages a second (mqtt.buffer.replay_rate)."""
    settings = MqttSettings(
        host="127.0.0.1", port=port, client_id=f"bench-replay-{os.getpid()}",
        topic_prefix="m2m/bench", buffer=BufferSettings(replay_rate=rate),
    )
    publisher = Publisher(settings, buffer)
    wall, cpu = time.perf_counter(), time.process_time()
    running = asyncio.create_task(publisher.run())
    while len(buffer):  # noqa: ASYNC110 - watching from outside, as a user would
        await asyncio.sleep(0.01)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    publisher.stop()
    await running
    return publisher.published, wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000, help="backlog size")
    args = parser.parse_args()
    n: int = args.messages

    from tests.helpers import mosquitto

    backlog = messages(n)
    payload = sum(len(m.payload) for m in backlog) / n
    topic = sum(len(m.topic) for m in backlog) / n
    print(f"DiskBuffer replay: {n:,} messages, payload {payload:.0f} B and topic {topic:.0f} B "
          f"on average; put in batches of {POLL}, taken in batches of {TAKE}")
    print(f"  Python {platform.python_version()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="m2m-replay-") as tmp:
        path = Path(tmp) / "state" / "buffer.db"
        buffer = DiskBuffer(path, max_messages=10 * n, max_bytes=1 << 40, max_age=7 * 86400)
        try:
            wall, cpu = timed(lambda: fill(buffer, backlog))
            report(f"put (batches of {POLL})", n, wall, cpu)
            full = file_sizes(path)
            per_message = path.stat().st_size / n
            wall, cpu = timed(lambda: drain(buffer))
            report(f"drain, take({TAKE}) + ack, no broker", n, wall, cpu)
            print(f"  file size when full: {full} ({per_message:.0f} B/message in the db)")
            print(f"  file size after drain: {file_sizes(path)} (SQLite reuses free pages; "
                  "it does not shrink the file)")

            with mosquitto(Path(tmp)) as broker:
                for rate, size in ((10**9, n), (1000, min(n, 10_000))):
                    fill(buffer, backlog[:size])
                    sent, wall, cpu = asyncio.run(replay_to_broker(buffer, broker.port, rate))
                    if sent != size or len(buffer):
                        raise SystemExit(f"replay incomplete: {sent} sent, {len(buffer)} left")
                    label = "unpaced" if rate > size else f"replay_rate {rate}/s"
                    report(f"Publisher replay to mosquitto, {label}", size, wall, cpu)
        finally:
            buffer.close()


if __name__ == "__main__":
    main()
