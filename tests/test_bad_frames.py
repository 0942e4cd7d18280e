"""Malformed replies and a device that refuses everything: one log line per change of state, no
traceback, and the failures counted as what they are (DESIGN.md, "Failure semantics": garbage,
short or CRC-failed frames are flushed, counted, and polling goes on).

Three raw Modbus TCP slaves (helpers.MbapServer), one per link (the connection is the link's:
a slave that hangs up must not take its neighbours with it), whose answers are written here
because they must misbehave on every request:
- `count`: a reply whose byte count does not match the data that follows it. pymodbus raised
  out of data_received on it; asyncio logged "Fatal error: protocol.data_received() call failed"
  with a traceback, once per reply, and dropped the connection (counted `link`);
- `cut`: an MBAP header announcing a reply, then a close (a truncated frame);
- `refuser`: exception 02 to every address, for 20 points (it logged 20 lines and stayed
  `online`, publishing nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from pathlib import Path

import pytest
import structlog
import yaml

from bridge.device import DeviceStats, poll_on_grid
from bridge.health import Activity
from tests.helpers import (
    Daemon,
    Hangup,
    MbapServer,
    free_port,
    metrics,
    mosquitto,
    recording,
    until,
)

PREFIX = "m2m/hostile"
OCCURRENCES = 6  # bad frames each device must have sent before its log is judged


def wrong_byte_count(tid: int, unit: int, pdu: bytes) -> bytes:
    count = struct.unpack(">H", pdu[3:5])[0]
    data = bytes(2 * count)
    reply = bytes([pdu[0], len(data) + 4]) + data  # says 4 bytes more than it carries
    return struct.pack(">HHHB", tid, 0, len(reply) + 1, unit) + reply


def header_then_close(tid: int, unit: int, pdu: bytes) -> Hangup:
    return Hangup(struct.pack(">HHHB", tid, 0, 7, unit))  # announces 2 registers, sends none


def refuse(tid: int, unit: int, pdu: bytes) -> bytes:
    reply = bytes([pdu[0] | 0x80, 2])  # illegal data address
    return struct.pack(">HHHB", tid, 0, len(reply) + 1, unit) + reply


def device(name: str, points: int = 1) -> dict[str, object]:
    return {
        "name": name, "link": name, "unit": 1, "interval": "200ms", "offline_after": 2,
        # One coalesced block; split, every point is refused on its own.
        "points": [{"name": f"p{i}", "address": i, "type": "uint16"}
                   for i in range(points)],
    }


@pytest.mark.integration
async def test_bad_frames_and_refusals_log_one_line_each_and_count_as_bad_frame(
    tmp_path: Path,
) -> None:
    slaves = {"count": MbapServer(wrong_byte_count), "cut": MbapServer(header_then_close),
              "refuser": MbapServer(refuse)}
    for slave in slaves.values():
        await slave.start()
    metrics_port = free_port()
    with mosquitto(tmp_path) as broker:
        config = tmp_path / "bridge.yaml"
        config.write_text(yaml.safe_dump({
            "version": 1,
            "gateway": {"id": "hostile", "state_dir": str(tmp_path / "state")},
            "mqtt": {"host": "127.0.0.1", "port": broker.port},
            "metrics": {"host": "127.0.0.1", "port": metrics_port},
            "links": [{"name": name, "type": "tcp", "host": "127.0.0.1", "port": slave.port,
                       "timeout": "300ms"} for name, slave in slaves.items()],
            "devices": [device("count"), device("cut"), device("refuser", points=20)],
        }, sort_keys=False))
        daemon = Daemon(config)
        try:
            async with recording(broker.port, f"{PREFIX}/+/status") as rec:
                daemon.start()
                await daemon.ready()

                def failures(name: str, kind: str, sample: dict[str, float]) -> float:
                    return sample.get(f'm2m_request_failures_total{{device="{name}",'
                                      f'kind="{kind}",link="{name}"}}', 0.0)

                sample: dict[str, float] = {}

                async def enough() -> bool:
                    nonlocal sample
                    sample = await metrics(metrics_port)
                    return all(failures(n, "bad_frame", sample) >= OCCURRENCES
                               for n in ("count", "cut"))

                await until(enough, what=lambda: f"{OCCURRENCES} bad frames each; {sample}")
                await rec.wait_for(lambda: all(
                    rec.last(f"{PREFIX}/{n}/status") == b"offline" for n in slaves))
                daemon.running()
        finally:
            daemon.stop()
            for slave in slaves.values():
                await slave.stop()

    log = daemon.output()
    assert "Traceback" not in log, log
    assert "Fatal error" not in log, log
    # Counted as bad frames, never as link failures.
    for name in ("count", "cut"):
        assert failures(name, "link", sample) == 0, sample
    assert sample['m2m_device_up{device="refuser",link="refuser"}'] == 0.0, sample
    assert failures("refuser", "exception_02", sample) >= 20, sample

    # One line per change of state: each device went offline once and said so once.
    for name in slaves:
        lines = [e for e in daemon.events() if e.get("device") == name]
        assert [e["event"] for e in lines] == ["device offline"], lines
    [refuser] = [e for e in daemon.events("device offline") if e["device"] == "refuser"]
    assert "refuses every point" in refuser["error"], refuser
    assert len(slaves["refuser"].requests) >= 20


async def test_back_off_after_a_day_of_failures_still_polls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A device refusing everything fails every poll; after ~1024 of them (hours at the 60 s
    cap) 2**n no longer fits a float: the back-off must still be computed, not raise."""
    monkeypatch.setattr("bridge.device.BACKOFF_CAP", 0.001)
    polls = 0

    async def failing() -> bool:
        nonlocal polls
        polls += 1
        return False

    grid = asyncio.create_task(poll_on_grid(
        0.001, failing, activity=Activity("t", 10.0), stats=DeviceStats(),
        log=structlog.get_logger("test"), failures=lambda: 5000,
    ))
    try:
        await until(lambda: polls >= 3 or grid.done(), what="three polls")
        assert not grid.done(), grid.exception()
    finally:
        grid.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await grid
