"""A full state disk never wedges delivery (issue 9, item 1).

The state_dir is a small tmpfs the test mounts; the broker stays away until the buffer says the
disk is full, then comes back: live readings must flow again at once, the backlog must drain and
be deleted, the disk must get its space back, and a restart must not replay what was delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from bridge.buffer import DiskBuffer
from bridge.core.messages import Message
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

pytestmark = pytest.mark.integration  # mounts a tmpfs, starts a broker and daemons

PREFIX = "m2m/fd"
QUEUE = "max_queued_messages 200000\n"  # the recorder's session keeps the whole backlog
POINTS = 100  # one read of 100 registers every 100 ms: 1,000 readings a second
DISK = 1 << 20  # 1 MiB of tmpfs: full in seconds
SLOW = 120.0  # the broker's return is seen after the daemon's reconnect back-off (up to ~30 s)
FULL = ("buffer disk full, storing nothing until space comes back: readings go straight to the"
        " broker while it is up, else are lost")


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs mounted for this test only, unmounted afterwards."""
    where = tmp_path / "state"
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK}", "tmpfs", str(where)],
                          capture_output=True, text=True, check=False)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs (needs root): {done.stderr.strip()}")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], check=False).returncode:
            subprocess.run(["umount", "-l", str(where)], check=False)


def write_config(tmp_path: Path, state: Path, broker: int, device: int, metrics_port: int) -> Path:
    points = [{"name": f"p{i}", "address": i, "type": "uint16"} for i in range(POINTS)]
    doc: dict[str, Any] = {
        "version": 1,
        "gateway": {"id": "fd", "state_dir": str(state)},
        "mqtt": {"host": "127.0.0.1", "port": broker, "qos": 1,
                 "buffer": {"replay_rate": 5000}},
        "links": [{"name": "plc", "type": "tcp", "host": "127.0.0.1", "port": device,
                   "timeout": "300ms"}],
        "devices": [{"name": "dev", "link": "plc", "unit": 1, "interval": "100ms",
                     "points": points}],
        "metrics": {"host": "127.0.0.1", "port": metrics_port},
    }
    path = tmp_path / "bridge.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture
async def device(tmp_path: Path) -> AsyncIterator[int]:
    port = free_port()
    async with simulated(write_config(tmp_path, tmp_path / "sim", 1, port, 1)):
        yield port


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def metric(port: int, name: str) -> float:
    return (await metrics(port)).get(name, -1.0)


async def test_full_disk_keeps_live_delivery_drains_and_recovers(
    tmp_path: Path, tmpfs: Path, device: int
) -> None:
    broker_port, metrics_port = free_port(), free_port()
    config = write_config(tmp_path, tmpfs, broker_port, device, metrics_port)
    with mosquitto(tmp_path, QUEUE, port=broker_port):
        async with recording(broker_port, f"{PREFIX}/#", session="rec"):
            pass  # a persistent session: the broker queues for it while it is away
    first, second = Daemon(config), Daemon(config)
    try:
        first.start()
        await first.ready()

        async def full() -> bool:
            first.running()
            return await metric(metrics_port, "m2m_buffer_disk_full") == 1

        started = time.monotonic()
        await until(full, SLOW, "the buffer to say the disk is full")
        filled_in = time.monotonic() - started
        found = await metrics(metrics_port)
        stored = found["m2m_buffer_messages"]
        assert stored > 1000, found
        # Readings polled with the disk full and no broker are counted lost, not stored.
        await until(lambda: metric_at_least(metrics_port, "m2m_buffer_lost_total", 1),
                    what="lost readings counted")

        with mosquitto(tmp_path, QUEUE, port=broker_port):
            async with recording(broker_port, f"{PREFIX}/#", session="rec") as rec:
                back = now_ms()
                # Live readings flow again: fresh ones, polled after the broker came back.
                await rec.wait_for(lambda: any(v["ts"] > back + 500
                                               for v in rec.values(f"{PREFIX}/dev/p0")),
                                   timeout=SLOW)
                live_at = now_ms()

                async def drained() -> bool:
                    found = await metrics(metrics_port)
                    return (found.get("m2m_buffer_messages", float("inf")) < POINTS * 5
                            and found.get("m2m_buffer_disk_full") == 0
                            and free_bytes(tmpfs) > DISK // 2)

                def backlog() -> int:
                    return len({(t, json_ts(p)) for t, p, _ in rec.messages
                                if t.startswith(f"{PREFIX}/dev/p") and json_ts(p) < back})

                # Everything stored while the broker was away arrives, and is deleted.
                await rec.wait_for(lambda: backlog() >= stored, timeout=SLOW)
                await until(drained, SLOW, lambda: f"the backlog to drain; {first.output()}")
                recovered_at = now_ms()
                first.signal(signal.SIGTERM)
                assert await asyncio.to_thread(first.wait) == 0, first.output()
                full_lines = first.events(FULL)  # the second daemon's log replaces it
                failed_deletes = first.events("buffer delete failed, will retry")
                again = await sent_again_after_restart(second, rec)
    finally:
        first.stop()
        second.stop()
    assert again == [], f"{len(again)} readings delivered before the restart came again"
    assert second.events("buffer opened with backlog") == []
    assert len(full_lines) == 1  # one line per change of state
    assert failed_deletes == []
    print(f"\nfull after {filled_in:.1f}s with {stored:.0f} rows on {DISK >> 10} KiB; live again "
          f"{(live_at - back) / 1000:.1f}s and drained {(recovered_at - back) / 1000:.1f}s "
          "after the broker came back")


async def sent_again_after_restart(daemon: Daemon, rec: Recorder) -> list[tuple[str, bytes]]:
    """Start `daemon` until it publishes fresh readings, stop it: the readings it sent that
    `rec` had seen before."""
    delivered = len(rec.messages)
    seen = {(t, p) for t, p, _ in rec.messages}
    restarted = now_ms()
    daemon.start()
    await daemon.ready()
    await rec.wait_for(lambda: any(v["ts"] > restarted + 500
                                   for v in rec.values(f"{PREFIX}/dev/p0")), timeout=SLOW)
    daemon.signal(signal.SIGTERM)
    assert await asyncio.to_thread(daemon.wait) == 0, daemon.output()
    return [(t, p) for t, p, _ in rec.messages[delivered:]
            if (t, p) in seen and t.startswith(f"{PREFIX}/dev/p")]


def json_ts(payload: bytes) -> int:
    with contextlib.suppress(ValueError, KeyError, TypeError):
        return int(json.loads(payload)["ts"])
    return -1


async def metric_at_least(port: int, name: str, value: float) -> bool:
    return await metric(port, name) >= value


def test_reserve_lets_deletes_through_when_something_else_fills_the_disk(tmpfs: Path) -> None:
    """The buffer stops storing at its headroom (refused readings go to a connected publisher);
    when another writer then fills the disk to the last byte, an ack still deletes (the reserve
    is given up), the drained file shrinks, and the reserve comes back with the space."""
    buf = DiskBuffer(tmpfs / "buffer.sqlite3", max_messages=10**9, max_bytes=10**9,
                     max_age=7 * 86400)
    reserve = tmpfs / "buffer.sqlite3.reserve"
    assert reserve.stat().st_size == buf.reserve_bytes
    n = 0

    def poll() -> list[Message]:
        nonlocal n
        n += 1
        ts = now_ms()
        return [Message(f"{PREFIX}/dev/p{i}", b'{"value":%d,"ts":%d}' % (n, ts), 1, False, ts)
                for i in range(POINTS)]

    while not buf.disk_full:
        buf.put(poll())
    stored = len(buf)
    buf.direct_to = object()  # a connected publisher: refused readings go to it
    live = poll()
    buf.put(live)
    assert len(buf) == stored
    assert buf.take_direct(1000) == live
    buf.direct_to = None
    buf.put(poll())
    assert buf.lost == 2 * POINTS  # the one that filled it, and one with nobody to take it
    filler = tmpfs / "filler"
    try:
        with filler.open("wb", buffering=0) as f, contextlib.suppress(OSError):
            while True:  # another writer takes every byte left
                f.write(bytes(4096))
        assert free_bytes(tmpfs) < 4096
        while taken := buf.take(500):
            buf.ack([s.id for s in taken])
        assert len(buf) == 0
        assert buf.deletes_pending == 0
        assert not reserve.exists()  # given up so the deletes could go through
    finally:
        filler.unlink()
    buf.put(poll())  # the space is back: the reserve first, then the reading
    assert not buf.disk_full
    assert reserve.stat().st_size == buf.reserve_bytes
    assert len(buf) == POINTS
    buf.close()
    assert (tmpfs / "buffer.sqlite3").stat().st_size < DISK // 4  # freed pages went back
