"""The serial simulator: RTU/ASCII slaves and line instruments on ptys, paced like a real line.

A client opens the pty the simulator announces, with pyserial, exactly as the bridge would.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import serial

from bridge.config import Config, Point, load_config
from bridge.core.bustime import rtu_seconds
from bridge.core.planner import plan_device
from bridge.sim.serial import SerialSimulator, crc16, example_line, lrc, with_crc
from bridge.sim.tcp import Simulator
from tests.helpers import ROOT, stop_process

RESPONSE = r"^S[TI],GS,\s*(?P<weight>[-+]?\d+\.\d+)\s*kg(,(?P<stable>[YN]))?"
CONFIG = f"""\
version: 1
gateway: {{id: gw-test}}
links:
  - {{name: rs485-1, type: rtu, port: /dev/null, baudrate: 9600, parity: E}}
  - {{name: ascii-1, type: ascii, port: /dev/null, baudrate: 9600, bytesize: 7, parity: E}}
  - {{name: scale-port, type: serial, port: /dev/null, baudrate: 9600}}
  - {{name: stream-port, type: serial, port: /dev/null, baudrate: 9600}}
devices:
  - name: plc-1
    link: rs485-1
    unit: 1
    points:
      - {{name: first, address: 0, simulate: {{value: 1234}}}}
      - {{name: last, address: 124, type: int16, simulate: {{value: -7}}}}
  - name: plc-2
    link: ascii-1
    unit: 2
    points:
      - {{name: level, table: input, address: 3, simulate: {{value: 42}}}}
  - name: scale-1
    link: scale-port
    request: "SI\\r\\n"
    response: '{RESPONSE}'
    points:
      - {{name: weight, type: float64, unit: kg, simulate: {{value: 12.5}}}}
      - {{name: stable, type: bool}}
  - name: streamer
    link: stream-port
    interval: 100ms
    response: '^W=(?P<weight>\\d+) g$'
    points:
      - {{name: weight, type: int32, scale: 0.001, unit: kg, simulate: {{value: 2.5}}}}
"""


@pytest.fixture
def config(tmp_path: Path) -> Config:
    path = tmp_path / "bridge.yaml"
    path.write_text(CONFIG)
    return load_config(path)


def serve(config: Config, directory: Path, baud: int | None) -> Iterator[SerialSimulator]:
    serial_sim = SerialSimulator(config, Simulator(config, seed=1), baud=baud,
                                 directory=directory, seed=1)
    serial_sim.start()
    try:
        yield serial_sim
    finally:
        serial_sim.stop()


@pytest.fixture
def paced(config: Config, tmp_path: Path) -> Iterator[SerialSimulator]:
    yield from serve(config, tmp_path / "paced", 9600)


@pytest.fixture
def instant(config: Config, tmp_path: Path) -> Iterator[SerialSimulator]:
    yield from serve(config, tmp_path / "instant", None)


def port(
    sim: SerialSimulator, link: str, parity: str = "N", timeout: float = 2, bytesize: int = 8
) -> serial.Serial:
    return serial.Serial(str(sim.lines[link].path), baudrate=9600, parity=parity,
                         timeout=timeout, bytesize=bytesize)


def rtu_read(line: serial.Serial, unit: int, fc: int, address: int, count: int) -> bytes:
    line.reset_input_buffer()
    line.write(with_crc(struct.pack(">BBHH", unit, fc, address, count)))
    return bytes(line.read(5 + 2 * count))


def test_crc_and_lrc_known_values() -> None:
    # Read holding 0+10 from unit 1: the textbook frame 01 03 00 00 00 0A C5 CD.
    assert with_crc(bytes.fromhex("01030000000A")) == bytes.fromhex("01030000000AC5CD")
    assert crc16(b"") == 0xFFFF
    assert lrc(bytes.fromhex("01030000000A")) == 0xF2


@pytest.mark.integration
def test_paced_rtu_read_of_125_registers_takes_line_time(paced: SerialSimulator) -> None:
    with port(paced, "rs485-1", parity="E") as line:
        rtu_read(line, 1, 3, 0, 1)  # warm up: the pty and the thread are live
        time.sleep(0.05)
        start = time.monotonic()
        reply = rtu_read(line, 1, 3, 0, 125)
        elapsed = time.monotonic() - start
    assert len(reply) == 255
    assert struct.unpack("<H", reply[-2:])[0] == crc16(reply[:-2])
    words = struct.unpack(">125H", reply[3:-2])
    assert words[0] == 1234
    assert words[124] == 0x10000 - 7
    # DESIGN.md: about 310 ms at 9600 baud; (8 + 255) * 11 / 9600 + silences. Pacing can only
    # make it slower, never faster; a loaded machine adds its own delay, so the upper bound is
    # loose (an unpaced pty answers in about a millisecond).
    assert 0.8 * 0.310 < elapsed < 3 * 0.310, elapsed


@pytest.mark.integration
def test_paced_line_time_matches_the_bus_model(paced: SerialSimulator) -> None:
    """Back to back reads take at least what report.rtu_seconds says, and not far more."""
    points = [Point(name=f"p{i}", address=a, type="float32") for i, a in enumerate((0, 60, 100))]
    requests = [r for g in plan_device(points, interval=1) for r in g.requests]
    with port(paced, "rs485-1", parity="E") as line:
        rtu_read(line, 1, 3, 0, 1)
        start = time.monotonic()
        for _ in range(5):
            for request in requests:
                rtu_read(line, 1, 3, request.address, request.count)
        elapsed = time.monotonic() - start
    theory = 5 * sum(rtu_seconds(r, 9600) for r in requests)
    # The lower bound is the model (pacing never goes faster than the line); the upper one
    # leaves room for a loaded machine: bench/bus.py measures how close it really is.
    assert theory * 0.97 < elapsed < theory * 2, (elapsed, theory)


@pytest.mark.integration
def test_unpaced_pty_is_instant(instant: SerialSimulator) -> None:
    with port(instant, "rs485-1", parity="E") as line:
        start = time.monotonic()
        reply = rtu_read(line, 1, 3, 0, 125)
        assert time.monotonic() - start < 0.1
    assert len(reply) == 255


@pytest.mark.integration
def test_bad_crc_unknown_unit_and_exceptions(instant: SerialSimulator) -> None:
    with port(instant, "rs485-1", parity="E", timeout=0.3) as line:
        frame = bytearray(with_crc(struct.pack(">BBHH", 1, 3, 0, 1)))
        frame[-1] ^= 0xFF
        line.write(bytes(frame))
        assert line.read(7) == b""  # a corrupted request gets no answer, as on a real bus
        assert rtu_read(line, 9, 3, 0, 1) == b""  # nobody is unit 9
        line.write(with_crc(struct.pack(">BBHH", 1, 3, 65535, 2)))
        assert line.read(5) == with_crc(bytes([1, 0x83, 2]))  # illegal data address
        assert rtu_read(line, 1, 3, 0, 1)[3:5] == struct.pack(">H", 1234)  # still answers
        line.write(with_crc(struct.pack(">BBHH", 1, 6, 124, 99)))
        assert line.read(8) == with_crc(struct.pack(">BBHH", 1, 6, 124, 99))
        assert rtu_read(line, 1, 3, 124, 1)[3:5] == struct.pack(">H", 99)


@pytest.mark.integration
def test_ascii_unit_answers(instant: SerialSimulator) -> None:
    with port(instant, "ascii-1", bytesize=7, parity="E") as line:
        request = bytes([2, 4, 0, 3, 0, 1])
        line.write(b":" + (request + bytes([lrc(request)])).hex().upper().encode() + b"\r\n")
        reply = line.readline()
    raw = bytes.fromhex(reply[1:].strip().decode())
    assert raw[:3] == bytes([2, 4, 2])
    assert struct.unpack(">H", raw[3:5])[0] == 42
    assert lrc(raw[:-1]) == raw[-1]


@pytest.mark.integration
def test_line_instrument_answers_requests(paced: SerialSimulator) -> None:
    with port(paced, "scale-port") as line:
        line.write(b"HELLO\r\n")  # not its request: ignored
        line.write(b"SI\r\n")
        start = time.monotonic()
        reply = line.readline().decode("latin-1")
        elapsed = time.monotonic() - start
    match = re.search(RESPONSE, reply)
    assert match is not None, reply
    assert abs(float(match["weight"]) - 12.5) < 0.01
    assert match["stable"] in ("1", "Y")
    assert reply.endswith("\r\n")
    assert elapsed > len(reply) * 10 / 9600 * 0.9  # 8N1: 10 bits a character


@pytest.mark.integration
def test_streaming_instrument_talks_on_its_own(instant: SerialSimulator) -> None:
    with port(instant, "stream-port") as line:
        line.reset_input_buffer()
        lines = [line.readline().decode() for _ in range(3)]
    for text in lines:
        assert re.fullmatch(r"W=2500 g\r\n", text), text


def test_example_line_fills_groups() -> None:
    assert example_line(r"^(?P<a>\d+),[A-C]+\s*x(?:y|z)", {"a": "17"}) == "17,Axy"
    assert re.search(RESPONSE, example_line(RESPONSE, {}))


@pytest.mark.integration
def test_simulate_command_announces_ptys(tmp_path: Path) -> None:
    path = tmp_path / "bridge.yaml"
    path.write_text(CONFIG)
    temp = tmp_path / "tmp"  # its own TMPDIR: the m2m-sim-* directory is ours to look for
    temp.mkdir()
    process = subprocess.Popen(
        [sys.executable, "-m", "bridge", "simulate", "-c", str(path), "--baud", "config"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT,
        env={**os.environ, "TMPDIR": str(temp)},
    )
    try:
        assert process.stdout is not None
        announced = {}
        for _ in range(4):
            text = process.stdout.readline()
            found = re.fullmatch(r"(\w+) link (\S+): connect to (\S+)\n", text)
            assert found, text
            announced[found[2]] = (found[1], Path(found[3]))
        assert set(announced) == {"rs485-1", "ascii-1", "scale-port", "stream-port"}
        kind, pty = announced["rs485-1"]
        assert kind == "rtu"
        with serial.Serial(str(pty), baudrate=9600, parity="E", timeout=2) as line:
            assert rtu_read(line, 1, 3, 0, 1)[3:5] == struct.pack(">H", 1234)
    finally:
        stop_process(process, timeout=30)  # SIGTERM; its stdout closed
    assert process.returncode == 0
    # Cleaned up on the way out; lexists, as a dangling link passes `not exists()`.
    assert not os.path.lexists(pty)
    assert os.listdir(temp) == []


@pytest.mark.integration
def test_rtu_units_seed_bit_points_from_their_register(tmp_path: Path) -> None:
    """The example pump on an RTU line: status_word reads 11, its hintless bits keep it."""
    pump_map = ROOT / "configs" / "maps" / "pump-drive.yaml"
    path = tmp_path / "pump.yaml"
    path.write_text(
        "version: 1\nlinks:\n  - {name: bus, type: rtu, port: /dev/null, baudrate: 19200}\n"
        f"devices:\n  - {{name: pump-1, link: bus, unit: 3, map: {pump_map}}}\n"
    )
    for sim in serve(load_config(path), tmp_path / "pump", None):
        with port(sim, "bus") as line:
            reply = rtu_read(line, 3, 3, 0, 1)
        assert reply[:3] == bytes([3, 3, 2])
        assert struct.unpack(">H", reply[3:5]) == (11,)
