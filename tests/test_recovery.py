"""Recovery on a serial line, against a scripted RTU slave on a socat pty pair.

The slave is written here, not taken from pymodbus, because it must misbehave on cue: refuse a
hole in its register map with exception 02, answer with a broken CRC, cut a reply short, answer
late, and vanish with its line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from pymodbus.framer import FramerRTU

from bridge.config import Config, SerialLink, load_config
from bridge.core.messages import Message
from bridge.core.planner import plan_device
from bridge.errors import BridgeError, DeviceError, TransportError
from bridge.poller import DevicePoller
from bridge.transports.link import Link
from bridge.transports.links import endpoint_for, link_silence
from bridge.transports.modbus import Endpoint, ModbusClient
from bridge.transports.modbus_errors import BadFrame, NoResponse
from tests.helpers import Socat, until

HOLE = range(10, 20)  # holding registers the slave refuses (exception 02)


def crc(frame: bytes) -> bytes:
    return FramerRTU.compute_CRC(frame).to_bytes(2, "big")


@dataclass
class ScriptedSlave:
    """An RTU slave for units 1 and 2: holding register i holds 100 * unit + i, but HOLE.

    `script` is a queue of misbehaviours, one per request that reaches a live unit:
    "bad_crc", "truncated", "late" (answer after `late_by` seconds), "ok".
    """

    path: Path
    units: tuple[int, ...] = (1, 2)
    script: list[str] = field(default_factory=list)
    late_by: float = 0.0
    requests: list[tuple[int, int, int, int]] = field(default_factory=list)  # unit fc addr n
    _fd: int = -1
    _buffer: bytes = b""
    _free_at: float = 0.0

    def start(self) -> None:
        self._fd = os.open(self.path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        asyncio.get_running_loop().add_reader(self._fd, self._readable)

    def stop(self) -> None:
        if self._fd >= 0:
            asyncio.get_running_loop().remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1

    def _readable(self) -> None:
        try:
            data = os.read(self._fd, 1024)
        except OSError:  # the line went away (socat stopped)
            self.stop()
            return
        self._buffer += data
        while len(self._buffer) >= 8:  # FC1-4 requests are 8 bytes
            frame, self._buffer = self._buffer[:8], self._buffer[8:]
            if crc(frame[:6]) != frame[6:]:
                self._buffer = b""  # lost sync: drop everything, as a real slave would
                return
            self._answer(frame)

    def _answer(self, frame: bytes) -> None:
        unit, fc = frame[0], frame[1]
        address = int.from_bytes(frame[2:4], "big")
        count = int.from_bytes(frame[4:6], "big")
        self.requests.append((unit, fc, address, count))
        if unit not in self.units:
            return  # not ours: silence, as on a real bus
        if fc != 3:
            reply = bytes([unit, fc | 0x80, 1])
        elif any(a in HOLE for a in range(address, address + count)):
            reply = bytes([unit, 0x83, 2])
        else:
            data = b"".join((100 * unit + a).to_bytes(2, "big")
                            for a in range(address, address + count))
            reply = bytes([unit, 3, len(data)]) + data
        framed = reply + crc(reply)
        how = self.script.pop(0) if self.script else "ok"
        if how == "bad_crc":
            framed = framed[:-1] + bytes([framed[-1] ^ 0xFF])
        elif how == "truncated":
            framed = framed[: len(framed) // 2]
        # One transmitter: a reply waits until the previous one (a late one, say) is out, as on
        # a real half-duplex line; 2 ms of turnaround otherwise.
        loop = asyncio.get_running_loop()
        now = loop.time()
        at = max(now + (self.late_by if how == "late" else 0.002), self._free_at)
        self._free_at = at + 0.001
        loop.call_at(at, self._write, framed)

    def _write(self, data: bytes) -> None:
        if self._fd >= 0:
            os.write(self._fd, data)

    def covered(self, since: int, registers: range) -> list[tuple[int, int, int, int]]:
        """Requests after the `since`-th that read any of `registers`."""
        return [r for r in self.requests[since:]
                if any(a in registers for a in range(r[2], r[2] + r[3]))]


@contextlib.asynccontextmanager
async def line_with_slave(tmp: Path) -> AsyncIterator[tuple[Socat, ScriptedSlave]]:
    with Socat(tmp / "slave-end", tmp / "master-end") as line:
        slave = ScriptedSlave(line.a)
        slave.start()
        try:
            yield line, slave
        finally:
            slave.stop()


def _config(tmp_path: Path, port: Path, devices: list[dict[str, object]]) -> Config:
    path = tmp_path / "bridge.yaml"
    path.write_text(yaml.safe_dump({
        "version": 1,
        "gateway": {"id": "rec"},
        "links": [{"name": "rs485", "type": "rtu", "port": str(port), "baudrate": 19200,
                   "timeout": "200ms", "max_gap": 30}],
        "devices": devices,
    }))
    return load_config(path)


def _device(name: str, unit: int, addresses: list[int], **extra: object) -> dict[str, object]:
    return {"name": name, "link": "rs485", "unit": unit, "interval": "200ms",
            "points": [{"name": f"r{a}", "address": a} for a in addresses], **extra}


def _link(config: Config, backoff_cap: float = 60.0) -> Link:
    spec = config.link("rs485")
    assert isinstance(spec, SerialLink)
    return Link(ModbusClient(endpoint_for(spec), backoff_cap=backoff_cap),
                silence=link_silence(spec))


def _poller(config: Config, link: Link, sink: list[Message],
            statuses: list[tuple[str, bool]], name: str) -> DevicePoller:
    device = next(d for d in config.devices if d.name == name)
    return DevicePoller(
        device, plan_device(device.points, interval=device.interval, max_gap=30), link,
        config.mqtt, emit=sink.extend, set_status=lambda n, up: statuses.append((n, up)),
    )


def _values(messages: list[Message], device: str) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for m in messages:
        parts = m.topic.split("/")
        if parts[-2] == device:
            out.setdefault(parts[-1], []).append(json.loads(m.payload)["value"])
    return out


@pytest.mark.integration
async def test_hole_in_a_coalesced_block_is_learned(tmp_path: Path) -> None:
    """Exception 02 for a block spanning HOLE: the points around it are published in the same
    poll, the hole is remembered, and the next poll sends nothing that covers it. A point
    inside the hole is skipped; its neighbours keep publishing."""
    async with line_with_slave(tmp_path) as (line, slave):
        config = _config(tmp_path, line.b, [
            _device("gap", 1, [0, 1, 5, 25, 26]),  # one block 0-26 across the hole
            _device("inside", 2, [0, 5, 15, 25]),  # r15 lies in the hole itself
        ])
        link = _link(config)
        messages: list[Message] = []
        statuses: list[tuple[str, bool]] = []
        try:
            for name in ("gap", "inside"):
                poller = _poller(config, link, messages, statuses, name)
                (group,) = poller.plan
                assert [(r.address, r.count) for r in group.requests] == [(0, 27 if name == "gap"
                                                                           else 26)]
                assert await poller.poll(group), poller.stats
                first = len(slave.requests)
                assert await poller.poll(group), poller.stats
                assert slave.covered(first, HOLE) == [], slave.requests[first:]
                assert slave.requests[first:], "the second poll sent nothing"
                assert poller.stats.failed_polls == 0
        finally:
            link.close()
    gap = _values(messages, "gap")
    assert gap == {f"r{a}": [100 + a, 100 + a] for a in (0, 1, 5, 25, 26)}
    inside = _values(messages, "inside")
    assert inside == {f"r{a}": [200 + a, 200 + a] for a in (0, 5, 25)}
    assert ("gap", False) not in statuses
    assert ("inside", False) not in statuses


@pytest.mark.integration
async def test_bad_crc_truncated_and_late_replies(tmp_path: Path) -> None:
    """Garbled replies are counted as bad frames and the next request is answered correctly;
    a reply that comes after the timeout is not taken for the answer to the next request."""
    async with line_with_slave(tmp_path) as (line, slave):
        client = ModbusClient(Endpoint("rtu", str(line.b), 0, 0.2, baudrate=19200))
        try:
            slave.script = ["bad_crc", "truncated"]
            with pytest.raises(BadFrame):
                await client.read(1, "holding", 0, 2)
            with pytest.raises(BadFrame):
                await client.read(1, "holding", 0, 2)
            assert await client.read(1, "holding", 0, 2) == [100, 101]
            assert client.counters.bad_frames == 2
            # Late: the reply to 30+2 comes 30 ms after the timeout, while the client is ready
            # for its next request of the same size from the same unit.
            slave.script, slave.late_by = ["late"], 0.23
            with pytest.raises(NoResponse):
                await client.read(1, "holding", 30, 2)
            assert await client.read(1, "holding", 50, 2) == [150, 151]
            assert client.counters.timeouts == 1
        finally:
            client.close()


@pytest.mark.integration
async def test_poller_counts_garbage_and_goes_on(tmp_path: Path) -> None:
    async with line_with_slave(tmp_path) as (line, slave):
        config = _config(tmp_path, line.b, [_device("m", 1, [0, 1], offline_after=3)])
        link = _link(config)
        messages: list[Message] = []
        statuses: list[tuple[str, bool]] = []
        poller = _poller(config, link, messages, statuses, "m")
        (group,) = poller.plan
        slave.script = ["bad_crc", "truncated"]
        try:
            assert not await poller.poll(group)
            assert not await poller.poll(group)
            assert await poller.poll(group)
        finally:
            link.close()
    assert poller.stats.failures == {"bad_frame": 2}
    assert _values(messages, "m") == {"r0": [100], "r1": [101]}
    assert statuses == [("m", True)]  # two failures < offline_after: never offline


@pytest.mark.integration
async def test_line_closing_and_reopening(tmp_path: Path) -> None:
    """socat stops (the tty vanishes, as when a USB converter is unplugged) and a new one
    takes the same paths: the link reopens by itself, the device goes offline and back."""
    line = Socat(tmp_path / "slave-end", tmp_path / "master-end")
    line.start()
    slave = ScriptedSlave(line.a)
    slave.start()
    config = _config(tmp_path, line.b, [_device("m", 1, [0], offline_after=2)])
    link = _link(config, backoff_cap=0.5)
    messages: list[Message] = []
    statuses: list[tuple[str, bool]] = []
    poller = _poller(config, link, messages, statuses, "m")
    task = asyncio.create_task(poller.run())

    async def status(what: tuple[str, bool]) -> None:
        await until(lambda: what in statuses,
                    what=lambda: f"status {what}; saw {statuses}, {poller.stats}")

    try:
        await status(("m", True))
        slave.stop()
        line.stop()
        await status(("m", False))
        assert poller.stats.failures.get("link", 0) >= 1, poller.stats
        assert not link.client.connected
        seen = len(messages)
        line.start()
        slave = ScriptedSlave(line.a)
        slave.start()
        statuses.clear()
        await status(("m", True))
        assert len(messages) > seen
        assert link.client.counters.connects >= 2
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        link.close()
        slave.stop()
        line.stop()


async def test_missing_port_is_a_transport_error(tmp_path: Path) -> None:
    client = ModbusClient(Endpoint("rtu", str(tmp_path / "ttyUSB9"), 0, 0.2), backoff_cap=0)
    with pytest.raises(TransportError, match="no such serial port"):
        await client.read(1, "holding", 0, 1)
    assert isinstance(TransportError("x"), BridgeError)
    assert not issubclass(TransportError, DeviceError)
