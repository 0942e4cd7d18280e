"""Daemon lifecycle: SIGHUP reload by difference, systemd notify and the watchdog."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import socket
import statistics
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml

from bridge.config import load_config
from bridge.health import Activity
from bridge.systemd import watchdog
from tests.helpers import Broker, Daemon, free_port, recording, simulated, until

PREFIX = "m2m/life"


def config_doc(broker: int, device: int, interval_b: str = "200ms") -> dict[str, Any]:
    point = [{"name": "v", "address": 0, "type": "uint16"}]
    return {
        "version": 1,
        "gateway": {"id": "life"},
        "mqtt": {"host": "127.0.0.1", "port": broker},
        "links": [{"name": "plc", "type": "tcp", "host": "127.0.0.1", "port": device,
                   "timeout": "300ms"}],
        "devices": [
            {"name": "a", "link": "plc", "unit": 1, "interval": "200ms", "points": point},
            {"name": "b", "link": "plc", "unit": 2, "interval": interval_b, "points": point},
        ],
    }


@pytest.fixture
async def setup(tmp_path: Path, broker: Broker) -> AsyncIterator[tuple[Path, Daemon]]:
    path = tmp_path / "bridge.yaml"
    path.write_text(yaml.safe_dump(config_doc(broker.port, free_port())))
    async with simulated(path):
        with Daemon(path) as daemon:
            yield path, daemon


def gaps(stamps: list[int]) -> list[int]:
    return [b - a for a, b in itertools.pairwise(stamps)]


@pytest.mark.integration
async def test_sighup_restarts_only_the_changed_device(
    setup: tuple[Path, Daemon], broker: Broker
) -> None:
    """Changing b's interval: b speeds up, a's readings show no gap across the reload."""
    path, daemon = setup
    async with recording(broker.port, f"{PREFIX}/#") as rec:
        daemon.start()
        await rec.wait_for(lambda: len(rec.payloads(f"{PREFIX}/a/v")) >= 5)
        path.write_text(yaml.safe_dump(config_doc(broker.port, _port(path), "50ms")))
        hup = time.time_ns() // 1_000_000
        daemon.signal(signal.SIGHUP)
        await rec.wait_for(lambda: '"reloaded"' in daemon.output())
        reloaded = time.time_ns() // 1_000_000
        reloaded_at = len(rec.payloads(f"{PREFIX}/b/v"))
        await rec.wait_for(lambda: len(rec.payloads(f"{PREFIX}/b/v")) >= reloaded_at + 20)
        await rec.wait_for(lambda: any(v["ts"] > reloaded + 1000
                                       for v in rec.values(f"{PREFIX}/a/v")))
    # a across the reload (from a second before SIGHUP to one after "reloaded"): on its 200 ms
    # grid, with room for a late poll on a busy machine; a restart (new connection, new grid)
    # would also leave its line in the log, checked below.
    a_stamps = [v["ts"] for v in rec.values(f"{PREFIX}/a/v") if hup - 1000 <= v["ts"]]
    a_stamps = [ts for ts in a_stamps if ts <= reloaded + 1000]
    assert max(gaps(a_stamps)) < 500, gaps(a_stamps)
    # b's rate after the reload, from its own timestamps: typically 50 ms apart, 200 ms at
    # the old interval; the median ignores the odd poll a loaded machine delays.
    b_after = [v["ts"] for v in rec.values(f"{PREFIX}/b/v")[reloaded_at:]]
    assert statistics.median(gaps(b_after)) < 120, gaps(b_after)
    assert "device b restarted" in daemon.output()
    assert "device a" not in daemon.output().split('"reloaded"')[-1]


@pytest.mark.integration
async def test_bad_config_on_sighup_keeps_the_old_one(
    setup: tuple[Path, Daemon], broker: Broker
) -> None:
    """A broken file on SIGHUP is logged with its location; polling goes on unchanged."""
    path, daemon = setup
    async with recording(broker.port, f"{PREFIX}/#") as rec:
        daemon.start()
        await rec.wait_for(lambda: len(rec.payloads(f"{PREFIX}/a/v")) >= 2)
        path.write_text(path.read_text().replace("interval: 200ms", "interval: soon", 1))
        daemon.signal(signal.SIGHUP)
        await rec.wait_for(lambda: "reload refused" in daemon.output())
        before = len(rec.payloads(f"{PREFIX}/a/v"))
        await rec.wait_for(lambda: len(rec.payloads(f"{PREFIX}/a/v")) >= before + 3)
    assert "devices[0].interval" in daemon.output()
    assert daemon.process is not None
    assert daemon.process.poll() is None


def _port(path: Path) -> int:
    port: int = yaml.safe_load(path.read_text())["links"][0]["port"]
    return port


@contextlib.contextmanager
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    sock.bind(str(path))
    sock.setblocking(False)
    try:
        yield sock
    finally:
        sock.close()


def drain(sock: socket.socket) -> list[str]:
    out: list[str] = []
    with contextlib.suppress(BlockingIOError):
        while True:
            out.append(sock.recv(4096).decode())
    return out


@pytest.mark.integration
async def test_watchdog_pings_stop_when_a_loop_is_stuck(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pings flow while loops make progress and stop once one is stuck past its bound."""
    with notify_socket(tmp_path) as sock, structlog.testing.capture_logs() as logs:
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
        healthy = Activity("poller", bound=10)
        hung = Activity("publisher", bound=0.2)
        rounds = 0

        def activities() -> list[Activity]:  # the watchdog asks once a round: counts them
            nonlocal rounds
            rounds += 1
            return [healthy, hung]

        task = asyncio.create_task(watchdog(activities, 0.05))
        pings: list[str] = []

        def pinged(times: int) -> bool:
            pings.extend(drain(sock))
            return pings.count("WATCHDOG=1") >= times

        await until(lambda: pinged(4), what="4 pings")
        with hung.running():  # an operation that never returns in time
            # Past the 0.2 s bound, the watchdog's next round says so and sends nothing.
            await until(lambda: any("withholding" in e["event"] for e in logs),
                        what="the watchdog to see the stuck loop")
            drain(sock)  # pings from the rounds before
            # Negative check: ten more rounds, none of which may ping.
            since = rounds + 1  # the round under way may have pinged before it looked
            await until(lambda: rounds >= since + 10, what="ten watchdog rounds")
            assert drain(sock) == []
        pings.clear()
        await until(lambda: pinged(1), what="pings to resume once the loop made progress")
        task.cancel()


@pytest.mark.integration
async def test_daemon_tells_systemd_ready_watchdog_and_stopping(
    tmp_path: Path, setup: tuple[Path, Daemon]
) -> None:
    """Under Type=notify the daemon sends READY=1, WATCHDOG=1 pings, then STOPPING=1."""
    _, daemon = setup
    with notify_socket(tmp_path) as sock:
        env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "400000"}
        daemon.start(env=env)
        seen: list[str] = []

        def pinged(times: int) -> bool:
            seen.extend(drain(sock))
            return daemon.running() and seen.count("WATCHDOG=1") >= times

        await until(lambda: pinged(3), what="READY=1 and 3 WATCHDOG=1 pings")
        assert seen[0] == "READY=1"
        daemon.signal(signal.SIGTERM)
        assert await asyncio.to_thread(daemon.wait) == 0
        assert "STOPPING=1" in drain(sock)
    assert os.environ.get("NOTIFY_SOCKET") is None


def _two_kinds(tmp_path: Path, max_messages: int = 1000) -> Path:
    doc = config_doc(1883, 1502)
    doc["gateway"]["state_dir"] = str(tmp_path / "state")
    doc["mqtt"]["buffer"] = {"max_messages": max_messages}
    doc["links"].append({"name": "scale-port", "type": "serial", "port": str(tmp_path / "tty")})
    doc["devices"].append({
        "name": "scale", "link": "scale-port", "request": "SI\r\n",
        "response": r"(?P<weight>\d+\.\d+)", "points": [{"name": "weight", "type": "float64"}],
    })
    path = tmp_path / "bridge.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_reload_of_an_unchanged_file_restarts_nothing(tmp_path: Path) -> None:
    """Modbus devices and line instruments alike keep running when nothing changed."""
    from bridge.service import Service

    service = Service(load_config(_two_kinds(tmp_path)))
    try:
        pollers = dict(service.pollers)
        assert service.reload(load_config(_two_kinds(tmp_path))) == []
        assert all(service.pollers[name] is poller for name, poller in pollers.items())
    finally:
        service.buffer.close()


def test_reload_applies_new_buffer_bounds_in_place(tmp_path: Path) -> None:
    """A new max_messages applies to the running buffer; no device restarts for it."""
    from bridge.service import Service

    service = Service(load_config(_two_kinds(tmp_path)))
    try:
        changes = service.reload(load_config(_two_kinds(tmp_path, max_messages=50)))
        assert "buffer bounds applied" in changes
        assert not [c for c in changes if c.startswith("device")]
        assert service.buffer.max_messages == 50
    finally:
        service.buffer.close()


async def test_signal_handlers_are_restored_when_the_daemon_returns() -> None:
    """The daemon's handlers live only while it runs (uvicorn's shape): a caller that runs it
    in-process gets its own signal dispositions back."""
    from bridge.daemon import _captured

    before = signal.getsignal(signal.SIGUSR1)
    heard = asyncio.Event()
    with _captured({signal.SIGUSR1: heard.set}):
        os.kill(os.getpid(), signal.SIGUSR1)
        await until(heard.is_set, what="the handler to run")
    assert signal.getsignal(signal.SIGUSR1) == before
