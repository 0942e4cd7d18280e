"""Serial and datagram links against real parts: socat pty pairs, pymodbus servers, the CLI.

Each serial test starts `socat` with two linked ptys in tmp_path: a pymodbus ModbusSerialServer
(or a scripted slave in test_recovery) holds one end, our client the other. Everything is
stopped by process id.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml
from pymodbus.framer import FramerType
from pymodbus.server import ModbusSerialServer, ModbusTcpServer, ModbusUdpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from bridge.config import Config, SerialLink, load_config
from bridge.core.codec import Table
from bridge.core.messages import Message
from bridge.core.planner import ReadRequest, plan_device
from bridge.poller import DevicePoller
from bridge.service import warn_overloaded_links
from bridge.transports.link import Link, Priority
from bridge.transports.links import build_links, link_silence
from bridge.transports.modbus import Endpoint, LinkKind, ModbusClient
from tests.helpers import Socat, cli, free_port, until

HOLDING_BASE = 1000  # unit u's holding register i holds u * HOLDING_BASE + i


def pty_pair(tmp: Path) -> Socat:
    """Two linked ptys, started on `with` and stopped after."""
    return Socat(tmp / "slave-end", tmp / "master-end")


def sim_device(unit: int) -> SimDevice:
    """Registers and bits that say which unit and address they came from."""
    regs = [unit * HOLDING_BASE + i for i in range(100)]
    return SimDevice(
        id=unit,
        simdata=(
            [SimData(0, values=[True, False] * 50, datatype=DataType.BITS)],
            [SimData(0, values=[False, True] * 50, datatype=DataType.BITS)],
            [SimData(0, values=regs, datatype=DataType.REGISTERS)],
            [SimData(0, values=[7 * unit] * 100, datatype=DataType.REGISTERS)],
        ),
    )


@contextlib.asynccontextmanager
async def serial_server(port: Path, units: tuple[int, ...] = (1,), *,
                        framer: FramerType = FramerType.RTU) -> AsyncIterator[None]:
    # pymodbus' SimDevice server answers exception 04 for a unit it does not have, whatever
    # `ignore_missing_devices` says; on a real RS-485 line that unit is silent. Its
    # trace_packet hook may rewrite outgoing frames: drop every RTU reply not from `units`.
    def silence_others(sending: bool, data: bytes) -> bytes:
        if sending and framer == FramerType.RTU and data and data[0] not in units:
            return b""
        return data

    server = ModbusSerialServer(
        [sim_device(u) for u in units], framer=framer, port=str(port), baudrate=19200,
        trace_packet=silence_others,
    )
    async with serving(server):
        yield


@contextlib.asynccontextmanager
async def serving(
    server: ModbusSerialServer | ModbusTcpServer | ModbusUdpServer,
) -> AsyncIterator[None]:
    """A pymodbus server serving in this loop until the block ends."""
    await server.serve_forever(background=True)
    try:
        yield
    finally:
        await server.shutdown()  # type: ignore[no-untyped-call]


async def _read_all(client: ModbusClient, unit: int) -> dict[Table, list[int]]:
    tables: tuple[Table, ...] = ("holding", "input", "coil", "discrete")
    return {t: await client.read(unit, t, 0, 4) for t in tables}


EXPECTED_UNIT_1 = {
    "holding": [1000, 1001, 1002, 1003], "input": [7, 7, 7, 7],
    "coil": [1, 0, 1, 0], "discrete": [0, 1, 0, 1],
}


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["rtu", "ascii"])
async def test_serial_reads_every_table(tmp_path: Path, kind: LinkKind) -> None:
    framer = FramerType.RTU if kind == "rtu" else FramerType.ASCII
    with pty_pair(tmp_path) as line:
        async with serial_server(line.a, framer=framer):
            client = ModbusClient(Endpoint(kind, str(line.b), 0, 0.5, baudrate=19200))
            try:
                assert await _read_all(client, 1) == EXPECTED_UNIT_1
                assert client.counters.bad_frames == client.counters.timeouts == 0
            finally:
                client.close()


@pytest.mark.integration
async def test_rtu_over_tcp(tmp_path: Path) -> None:
    """A transparent serial server: RTU frames, no MBAP header, over a TCP socket."""
    port = free_port()
    server = ModbusTcpServer([sim_device(1)], framer=FramerType.RTU, address=("127.0.0.1", port))
    async with serving(server):
        client = ModbusClient(Endpoint("rtu-over-tcp", "127.0.0.1", port, 0.5))
        try:
            assert await _read_all(client, 1) == EXPECTED_UNIT_1
        finally:
            client.close()


@pytest.mark.integration
async def test_udp(tmp_path: Path) -> None:
    port = free_port()
    async with serving(ModbusUdpServer([sim_device(1)], address=("127.0.0.1", port))):
        client = ModbusClient(Endpoint("udp", "127.0.0.1", port, 0.5))
        try:
            assert await _read_all(client, 1) == EXPECTED_UNIT_1
        finally:
            client.close()


@pytest.mark.integration
async def test_read_cli_with_rtu_and_udp_urls(tmp_path: Path) -> None:
    # The CLI as a subprocess that does not block this loop: the server under test lives in it.
    with pty_pair(tmp_path) as line:
        async with serial_server(line.a):
            done = await cli(
                "read", f"rtu://{line.b}?baudrate=19200&parity=N&stopbits=1&bytesize=8",
                "--unit", "1", "--table", "holding", "--address", "2", "--count", "2", "--json",
            )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [{"address": 2, "value": 1002},
                                       {"address": 3, "value": 1003}]
    port = free_port()
    async with serving(ModbusUdpServer([sim_device(1)], address=("127.0.0.1", port))):
        done = await cli(
            "read", f"udp://127.0.0.1:{port}", "--unit", "1", "--table", "input",
            "--address", "0", "--json",
        )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [{"address": 0, "value": 7}]


@pytest.mark.integration
async def test_read_cli_names_bad_serial_settings() -> None:
    done = await cli("read", "rtu:///dev/ttyUSB0?baudrate=fast&parity=E",
                     "--unit", "1", "--table", "holding", "--address", "0")
    assert done.returncode == 2
    assert "baudrate='fast'" in done.stderr
    done = await cli("read", "ascii:///dev/ttyS0?parity=Q",
                     "--unit", "1", "--table", "holding", "--address", "0")
    assert done.returncode == 2
    assert "parity='Q'" in done.stderr


def _line_config(tmp_path: Path, port: Path, *, interval: str, timeout: str,
                 units: tuple[int, ...], baudrate: int = 19200) -> Config:
    path = tmp_path / "bridge.yaml"
    path.write_text(yaml.safe_dump({
        "version": 1,
        "gateway": {"id": "serial"},
        "links": [{"name": "rs485-1", "type": "rtu", "port": str(port), "baudrate": baudrate,
                   "parity": "N", "timeout": timeout}],
        "devices": [
            {"name": f"meter-{u}", "link": "rs485-1", "unit": u, "interval": interval,
             "offline_after": 2,
             "points": [{"name": "a", "address": 0}, {"name": "b", "address": 1}]}
            for u in units
        ],
    }))
    return load_config(path)


LIVE_POLLS = 20  # readings of each live unit the dead-unit test waits for (~5 s)


class TimedLink(Link):
    """A Link that records how long each unit held the bus."""

    def __init__(self, link: Link) -> None:
        super().__init__(link.client, silence=link.scheduler.silence)
        self.held: list[tuple[int, float]] = []

    async def read(
        self, unit: int, request: ReadRequest, priority: Priority = Priority.POLL
    ) -> list[int]:
        async with self.scheduler.turn(priority):
            started = time.monotonic()
            try:
                return await self.client.read(
                    unit, request.table, request.address, request.count
                )
            finally:
                self.held.append((unit, time.monotonic() - started))


def _pollers(config: Config, link: Link, sink: list[Message],
             statuses: list[tuple[str, bool]]) -> list[DevicePoller]:
    return [
        DevicePoller(
            device, plan_device(device.points, interval=device.interval), link, config.mqtt,
            emit=sink.extend, set_status=lambda name, up: statuses.append((name, up)),
        )
        for device in config.devices
    ]


@pytest.mark.integration
async def test_dead_unit_does_not_starve_the_line(tmp_path: Path) -> None:
    """Three units on one line, unit 3 dead: 1 and 2 keep polling, 3 goes offline, each
    attempt at 3 costs the bus no more than its timeout (plus the settle wait that keeps a
    late reply from being taken for the next answer) and the attempts thin out, so the dead
    unit holds the bus for a small share of the time, however slow the machine."""
    timeout = 0.1
    with pty_pair(tmp_path) as line:
        config = _line_config(tmp_path, line.b, interval="250ms", timeout="100ms",
                              units=(1, 2, 3))
        async with serial_server(line.a, units=(1, 2)):
            link = TimedLink(build_links(config)["rs485-1"])
            messages: list[Message] = []
            statuses: list[tuple[str, bool]] = []
            pollers = _pollers(config, link, messages, statuses)
            live = [p for p in pollers if p.device.unit != 3]
            started = time.monotonic()
            tasks = [asyncio.create_task(p.run()) for p in pollers]

            def readings(device: str) -> int:
                return sum(1 for m in messages if m.topic == f"m2m/serial/{device}/a")

            def enough() -> bool:
                # Readings published, not polls counted: a poll is counted as it starts.
                return (all(readings(p.device.name) >= LIVE_POLLS for p in live)
                        and ("meter-3", False) in statuses
                        and sum(1 for unit, _ in link.held if unit == 3) >= 3)

            try:
                await until(enough, 60, lambda: f"{LIVE_POLLS} readings of each live unit, "
                            f"meter-3 offline: {[p.stats for p in pollers]}")
                # What happened so far; the attempt the cancel below cuts short is no timeout.
                held, timeouts = list(link.held), link.client.counters.timeouts
                live_failures = sum(p.stats.failed_polls for p in live)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                link.close()
            window = time.monotonic() - started
    assert ("meter-3", False) in statuses
    assert ("meter-1", True) in statuses
    assert ("meter-2", True) in statuses
    dead = [seconds for unit, seconds in held if unit == 3]
    settle = link.client._settle
    # Under a second timeout: one attempt, never a retry, however late the loop woke.
    assert max(dead) < 2 * timeout + settle, dead
    # Back-off: attempts at the dead unit thin out; with doubling steps from 250 ms (jittered
    # down to half) at most ~7 fit in 5 s, far from the 20 a fixed schedule would make.
    assert len(dead) <= 8 + max(0.0, window - 5.0) / 2, (len(dead), window)
    # So the dead unit held the bus for a small share of the time: a fixed schedule without
    # back-off (an attempt per 250 ms tick, each a 100 ms timeout and the settle) holds it
    # for more than 40 %, and a slower machine only lengthens the window.
    assert sum(dead) <= 0.3 * window, (sum(dead), window)
    # Every attempt at the dead unit timed out; a live unit's reply a loaded machine delays
    # past the timeout is the only other timeout there may be.
    assert len(dead) <= timeouts <= len(dead) + live_failures


async def test_serial_link_silence_and_capacity_warning(tmp_path: Path) -> None:
    """The RTU gap is the scheduler's silence; a line that cannot carry its polls is named."""
    config = _line_config(tmp_path, tmp_path / "nowhere", interval="10ms", timeout="100ms",
                          units=(1, 2), baudrate=9600)
    link = config.link("rs485-1")
    assert isinstance(link, SerialLink)
    assert link_silence(link) == pytest.approx(3.5 * 11 / 9600)
    plans = {d.name: plan_device(d.points, interval=d.interval) for d in config.devices}
    with structlog.testing.capture_logs() as logs:
        warn_overloaded_links(config, plans)
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == 1
    event: Any = warnings[0]["event"]
    assert event.startswith("link rs485-1 needs ")
    assert event.endswith("% of its bus time at 9600 baud")
    relaxed = _line_config(tmp_path, tmp_path / "nowhere", interval="5s", timeout="100ms",
                           units=(1, 2), baudrate=9600)
    with structlog.testing.capture_logs() as logs:
        warn_overloaded_links(relaxed, {
            d.name: plan_device(d.points, interval=d.interval) for d in relaxed.devices
        })
    assert not logs
