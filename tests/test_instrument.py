"""Line instruments over a real serial line: a socat pty pair, the instrument scripted here.

The bridge opens one end (`dev`); the test plays the instrument on the other (`inst`): it
answers requests or streams lines, with junk lines in between. socat is started and stopped by
its pid, and killed and restarted on the same paths to prove the port recovers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from serial_asyncio_fast import open_serial_connection

from bridge.config import Device, LineLink, MqttSettings, Point
from bridge.core.messages import Message
from bridge.instrument import InstrumentPoller, parse_text
from bridge.transports.line import LinePort
from tests.helpers import Daemon, Socat, cli, mosquitto, recording, until

pytestmark = pytest.mark.skipif(shutil.which("socat") is None, reason="needs socat")

RESPONSE = (
    r"^S[TI],GS,\s*(?P<weight>[-+]?\d+\.\d+)\s*kg,(?P<count>\d+),(?P<stable>[YN]),(?P<tag>\w+)"
)
POINTS = [
    Point(name="weight", type="float64", unit="kg", precision=2),
    Point(name="count", type="int32", scale=10),
    Point(name="stable", type="bool"),
    Point(name="tag", type="string", count=8),  # config demands count for strings, even here
]


@pytest.fixture
def line(tmp_path: Path) -> Iterator[Socat]:
    socat = Socat(tmp_path / "ttyBRIDGE", tmp_path / "ttyINST")  # a: the bridge, b: the scale
    socat.start()
    try:
        yield socat
    finally:
        socat.kill()


@dataclass
class Instrument:
    """The far end, scripted: answers `SI` (or streams), with junk before every reading."""

    path: Path
    weight: float = 12.3456
    answer: bool = True
    stream_every: float | None = None  # seconds between streamed lines; None: answer requests
    requests: int = 0
    sent: int = 0
    _task: asyncio.Task[None] | None = field(default=None, repr=False)

    def reading(self) -> bytes:
        return f"ST,GS,  {self.weight:+.4f} kg,7,Y,AB12\r\n".encode()

    async def _serve(self) -> None:
        reader, writer = await open_serial_connection(url=str(self.path), baudrate=9600)
        try:
            if self.stream_every is not None:
                while True:
                    writer.write(b"junk line\r\n" + self.reading())
                    self.sent += 1
                    self.weight += 1
                    await asyncio.sleep(self.stream_every)
            while True:
                request = await reader.readuntil(b"\r\n")
                if request.strip() == b"SI":
                    self.requests += 1
                    if self.answer:
                        writer.write(b"\x00garbage\r\nOK\r\n" + self.reading())
        finally:
            writer.close()

    def start(self) -> None:
        self._task = asyncio.create_task(self._serve())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None


@contextlib.asynccontextmanager
async def instrument(path: Path, **kwargs: object) -> AsyncIterator[Instrument]:
    inst = Instrument(path, **kwargs)  # type: ignore[arg-type]
    inst.start()
    try:
        yield inst
    finally:
        await inst.stop()


@dataclass
class Sink:
    messages: list[Message] = field(default_factory=list)
    statuses: list[bool] = field(default_factory=list)

    def emit(self, messages: list[Message]) -> None:
        self.messages.extend(messages)

    def status(self, _device: str, online: bool) -> None:
        self.statuses.append(online)

    def payloads(self, point: str) -> list[dict[str, object]]:
        topic = f"m2m/gw/scale-1/{point}"
        return [json.loads(m.payload) for m in self.messages if m.topic == topic]


def make_poller(dev: Path, sink: Sink, *, request: bool = True, interval: float = 0.2,
                timeout: float = 0.3, offline_after: int = 3) -> InstrumentPoller:
    link = LineLink(name="scale-port", type="serial", port=str(dev), timeout=timeout)
    device = Device(
        name="scale-1", link="scale-port", interval=interval, offline_after=offline_after,
        request="SI\r\n" if request else None, response=RESPONSE, points=POINTS,
    )
    return InstrumentPoller(
        device, LinePort(link, backoff_cap=0.5), MqttSettings(topic_prefix="m2m/gw"),
        emit=sink.emit, set_status=sink.status,
    )


@contextlib.asynccontextmanager
async def running(poller: InstrumentPoller) -> AsyncIterator[None]:
    task = asyncio.create_task(poller.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_parse_text_types() -> None:
    assert parse_text(Point(name="a", type="float32"), " +1.5 ") == 1.5
    assert parse_text(Point(name="a", type="int16"), "-42") == -42
    assert parse_text(Point(name="a", type="bool"), "ON") is True
    assert parse_text(Point(name="a", type="bool"), "n") is False
    assert parse_text(Point(name="a", type="string", count=2), " AB ") == "AB"
    with pytest.raises(ValueError, match="boolean"):
        parse_text(Point(name="a", type="bool"), "maybe")
    with pytest.raises(ValueError, match="invalid literal"):
        parse_text(Point(name="a", type="uint16"), "1.5")


@pytest.mark.integration
async def test_request_mode_publishes_typed_values_and_counts_junk(line: Socat) -> None:
    sink = Sink()
    poller = make_poller(line.a, sink)
    async with instrument(line.b) as inst, running(poller):
        await until(lambda: len(sink.payloads("weight")) >= 3)
    weight = sink.payloads("weight")[0]
    assert weight["value"] == 12.35  # precision 2
    assert weight["unit"] == "kg"
    assert isinstance(weight["ts"], int)
    assert sink.payloads("count")[0]["value"] == 70  # int32 raw 7, scale 10: still an integer
    assert "unit" not in sink.payloads("count")[0]
    assert sink.payloads("stable")[0]["value"] is True
    assert sink.payloads("tag")[0]["value"] == "AB12"
    assert sink.statuses == [True]
    stats = poller.stats
    assert stats.failed_polls == 0
    assert inst.requests >= 3
    assert stats.unmatched >= 2 * 3  # "\x00garbage" and "OK" before every reading
    assert stats.bad_values == 0


@pytest.mark.integration
async def test_streaming_mode_publishes_latest_line_per_interval(line: Socat) -> None:
    sink = Sink()
    poller = make_poller(line.a, sink, request=False, interval=0.3)
    async with instrument(line.b, stream_every=0.05) as inst, running(poller):
        await until(lambda: len(sink.payloads("weight")) >= 4)
        sent = inst.sent
    values = [float(str(p["value"])) for p in sink.payloads("weight")]
    assert values == sorted(values)
    assert len(set(values)) == len(values)  # a fresh line each time
    assert len(values) < sent  # ~6 lines an interval, one publication
    assert poller.stats.superseded > 0
    assert poller.stats.unmatched > 0
    assert poller.stats.failed_polls == 0
    assert sink.statuses == [True]


@pytest.mark.integration
async def test_no_answer_goes_offline_and_back(line: Socat) -> None:
    sink = Sink()
    poller = make_poller(line.a, sink, interval=0.1, timeout=0.1, offline_after=2)
    async with instrument(line.b, answer=False) as inst, running(poller):
        await until(lambda: sink.statuses == [False])
        # The instrument reads its requests in this loop too: it may count the second late.
        await until(lambda: inst.requests >= 2, what="the instrument to see both requests")
        assert sink.messages == []
        assert poller.stats.failures.get("no_response", 0) >= 2
        inst.answer = True
        await until(lambda: sink.statuses == [False, True])
    assert sink.payloads("weight")


@pytest.mark.integration
async def test_streaming_silence_goes_offline(line: Socat) -> None:
    sink = Sink()
    poller = make_poller(line.a, sink, request=False, interval=0.1, timeout=0.1,
                         offline_after=2)
    async with running(poller):
        await until(lambda: sink.statuses == [False])
        async with instrument(line.b, stream_every=0.05):
            await until(lambda: sink.statuses == [False, True])


@pytest.mark.integration
async def test_port_closed_and_reopened_recovers(line: Socat) -> None:
    sink = Sink()
    poller = make_poller(line.a, sink, interval=0.1, timeout=0.2, offline_after=2)
    async with running(poller):
        async with instrument(line.b):
            await until(lambda: sink.statuses == [True])
            line.kill()
            await until(lambda: sink.statuses == [True, False])
            assert not poller.port.connected
        published = len(sink.payloads("weight"))
        line.start()  # same paths, new ptys: what a replugged USB converter looks like
        async with instrument(line.b):
            await until(lambda: sink.statuses == [True, False, True])
            await until(lambda: len(sink.payloads("weight")) > published)
    assert poller.port.opens >= 2


@pytest.mark.integration
async def test_daemon_publishes_instrument_readings(line: Socat, tmp_path: Path) -> None:
    with mosquitto(tmp_path) as broker:
        config = tmp_path / "bridge.yaml"
        config.write_text(
            "version: 1\n"
            "gateway: {id: gw-test}\n"
            f"mqtt: {{host: 127.0.0.1, port: {broker.port}}}\n"
            "links:\n"
            f"  - {{name: scale-port, type: serial, port: '{line.a}', baudrate: 9600,"
            " timeout: 500ms}\n"
            "devices:\n"
            "  - name: scale-1\n"
            "    link: scale-port\n"
            "    interval: 200ms\n"
            "    request: \"SI\\r\\n\"\n"
            f"    response: '{RESPONSE}'\n"
            "    points:\n"
            "      - {name: weight, type: float64, unit: kg, precision: 1}\n"
            "      - {name: count, type: int32, scale: 10}\n"
            "      - {name: stable, type: bool}\n"
            "      - {name: tag, type: string, count: 2}\n"
        )
        daemon = Daemon(config)
        async with recording(broker.port, "m2m/gw-test/#") as rec, instrument(line.b):
            daemon.start()
            try:
                # A poll's points are separate messages: wait for each, not only the first.
                points = [f"m2m/gw-test/scale-1/{p}" for p in ("weight", "count", "stable", "tag")]
                await rec.wait_for(lambda: all(rec.last(t) is not None for t in points))
                await rec.wait_for(lambda: rec.last("m2m/gw-test/scale-1/status") == b"online")
                weight = rec.values("m2m/gw-test/scale-1/weight")[0]
                assert weight["value"] == 12.3
                assert weight["unit"] == "kg"
                assert rec.values("m2m/gw-test/scale-1/count")[0]["value"] == 70
                assert rec.values("m2m/gw-test/scale-1/stable")[0]["value"] is True
                assert rec.values("m2m/gw-test/scale-1/tag")[0]["value"] == "AB12"
                line.kill()  # the line dies under a running daemon: offline, never a crash
                await rec.wait_for(lambda: rec.last("m2m/gw-test/scale-1/status") == b"offline")
                assert daemon.process is not None
                assert daemon.process.poll() is None
            finally:
                daemon.signal(signal.SIGTERM)
                assert daemon.wait() == 0, daemon.output()


def _scale_config(tmp_path: Path, dev: Path, *, request: bool) -> Path:
    lines = [
        "version: 1",
        f"links: [{{name: scale-port, type: serial, port: '{dev}', timeout: 2s}}]",
        "devices:",
        "  - name: scale-1",
        "    link: scale-port",
        *(["    request: \"SI\\r\\n\""] if request else []),
        "    response: '{}'".format(RESPONSE.replace("'", "''")),
        "    points:",
        "      - {name: weight, type: float64, unit: kg, precision: 2}",
        "      - {name: count, type: int32}",
        "      - {name: stable, type: bool}",
        "      - {name: tag, type: string, count: 8}",
    ]
    path = tmp_path / "scale.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.integration
@pytest.mark.parametrize("request_mode", [True, False])
async def test_cli_reads_an_instrument_once(
    tmp_path: Path, line: Socat, request_mode: bool
) -> None:
    """`read -c FILE DEVICE` works for line instruments, asking or listening as configured."""
    config = _scale_config(tmp_path, line.a, request=request_mode)
    stream = None if request_mode else 0.1
    async with instrument(line.b, stream_every=stream):
        done = await cli("read", "-c", str(config), "scale-1", "--json")
    assert done.returncode == 0, done.stderr
    rows = {row["point"]: row["value"] for row in json.loads(done.stdout)}
    assert rows["stable"] is True
    assert rows["tag"] == "AB12"
    assert isinstance(rows["weight"], float)


@pytest.mark.integration
async def test_cli_read_of_a_silent_instrument_is_one_line(tmp_path: Path, line: Socat) -> None:
    """No answer within the link timeout: exit 1 and one line naming the device."""
    config = _scale_config(tmp_path, line.a, request=True)
    async with instrument(line.b, answer=False):
        done = await cli("read", "-c", str(config), "scale-1")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"m2m-bridge: device 'scale-1': no line matching `response` within 2s on {line.a}"
    ]
