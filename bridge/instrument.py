"""Line instruments: devices on `type: serial` links that speak ASCII lines, not Modbus.

A device's `response` regex is matched (re.search) against every line; its named groups become
the points of the same name, converted to the point's type and normalised like any register
(`values`, scale, offset, precision), then published through the same Outbox as Modbus
devices, so topics, payloads and `report: on-change` are identical.

Two modes, chosen by whether the device has a `request`:

- **poll-by-request**: every `interval` send `request` and wait up to the link's `timeout`
  for a matching line. Lines that do not match (echoes, prompts, a status line in between)
  are counted and skipped; no matching line in time is a failed poll.
- **streaming** (no `request`): the instrument talks on its own. Every line is parsed as it
  arrives, but only the *latest* matching line of each interval is published. Streaming
  scales and analysers commonly send 5-20 lines a second; the integrator's `interval` says
  how often the value is wanted, and publishing every line would multiply MQTT traffic (the
  expensive part, DESIGN.md "Performance model") for readings nobody asked for. The latest
  line is the freshest value, with its own arrival time as `ts`. If none arrived in the
  interval, the poll waits up to `timeout` for one, then counts as failed.

A device goes offline after `offline_after` failed polls in a row and online on the next
success, as Modbus devices do. Failed polls back off exponentially in request mode (a dead
instrument then costs the shared port little); a streaming instrument is never asked for
anything, so it keeps listening every interval and is back online as soon as it talks.

Request and response text is Latin-1: every byte maps to one character and back, so YAML
escapes such as "\\x05" in `request` reach the wire unchanged and no reply can fail to decode.
"""

from __future__ import annotations

import asyncio
import re
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic

import structlog

from bridge.core.codec import Value
from bridge.core.messages import Message
from bridge.core.normalize import engineering
from bridge.core.outbox import Outbox
from bridge.core.planner import PollGroup
from bridge.device import DeviceStats, DeviceStatus, poll_on_grid
from bridge.errors import TransportError
from bridge.health import Activity
from bridge.transports.line import Line, LinePort, LineReader
from bridge.transports.ports import InstrumentPort

if TYPE_CHECKING:
    from bridge.config import Device, MqttSettings, Point

log = structlog.get_logger("bridge.instrument")

ENCODING = "latin-1"
_TRUE = frozenset({"1", "true", "on", "yes", "y", "t"})
_FALSE = frozenset({"0", "false", "off", "no", "n", "f"})
_INTEGER_TYPES = frozenset({"int16", "uint16", "int32", "uint32", "int64", "uint64"})


@dataclass(slots=True)
class InstrumentStats(DeviceStats):
    """DeviceStats plus what a line instrument adds."""

    lines: int = 0
    unmatched: int = 0  # lines the response regex did not match: counted, never fatal
    superseded: int = 0  # streaming: matching lines replaced by a later one in the interval


def parse_text(point: Point, text: str) -> Value:
    """A regex group's text as the point's raw type (before scale/offset).

    Raises ValueError for text that is not a value of that type.
    """
    text = text.strip()
    if point.type == "string":
        return text
    if point.type == "bool":
        word = text.lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
        raise ValueError(f"{text!r} is not a boolean")
    if point.type in _INTEGER_TYPES:
        return int(text)
    return float(text)


# The port type a poller was given, so its owner keeps seeing it as that (`poller.port.opens`
# of a LinePort); a bare `InstrumentPoller` is one on a LinePort. The default (PEP 696) is
# for the type checker: typing_extensions' TypeVar would cost the daemon 0.5 MiB of RSS.
if TYPE_CHECKING:
    from typing_extensions import TypeVar

    PortT = TypeVar("PortT", bound=InstrumentPort, default=LinePort)
else:
    PortT = typing.TypeVar("PortT", bound=InstrumentPort)


class InstrumentPoller(Generic[PortT]):
    """Polls (or listens to) one line instrument forever; emits messages and status changes."""

    def __init__(
        self,
        device: Device,
        port: PortT,
        mqtt: MqttSettings,
        *,
        emit: Callable[[list[Message]], None],
        set_status: Callable[[str, bool], None],
    ) -> None:
        if device.response is None:
            raise ValueError(f"device {device.name!r}: a line instrument needs `response`")
        self.device = device
        self.port = port
        self.emit = emit
        self.stats = InstrumentStats()
        self.timeout = port.link.timeout
        self.reader = LineReader(device.eol.encode(ENCODING))
        # A poll waits for its turn on the port, a write and a reply: bound it generously.
        self.activity = Activity(f"device {device.name}", 10.0 + 4 * self.timeout)
        self.plan: tuple[PollGroup, ...] = ()  # no registers: nothing for the bus-load check
        self._request = None if device.request is None else device.request.encode(ENCODING)
        self._regex = re.compile(device.response)
        self._points = {p.name: p for p in device.points if p.name in self._regex.groupindex}
        self._outbox = Outbox(device, mqtt)
        self._latest: tuple[re.Match[str], Line] | None = None
        self.last_values: dict[str, Value] = {}  # of the last successful poll
        self._fresh = asyncio.Event()
        self._log = log.bind(device=device.name)
        self.status = DeviceStatus(device, set_status, self._outbox, self._log)

    @property
    def online(self) -> bool:
        return self.status.online

    @property
    def streaming(self) -> bool:
        return self._request is None

    async def run(self) -> None:
        interval = self.device.interval
        async with self.port.attached(self.reader):
            if self.streaming:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self.listen(), name=f"listen {self.device.name}")
                    # Listening costs the line nothing: no back-off while it is silent, and
                    # no catching up either (a poll waits for a line, the line is not busy).
                    tg.create_task(poll_on_grid(
                        interval, self.poll_stream, activity=self.activity, stats=self.stats,
                        log=self._log, failures=None, work_conserving=False,
                    ))
            else:
                await poll_on_grid(
                    interval, self.poll_request, activity=self.activity, stats=self.stats,
                    log=self._log, failures=lambda: self.status.failures,
                )

    async def poll_request(self) -> bool:
        """Send `request`, publish the first matching line within `timeout`."""
        assert self._request is not None
        self.stats.polls += 1
        async with self.port.transaction():
            # Whatever arrived since the last poll (a late answer, unsolicited chatter) is not
            # the answer to this request: count it, drop it.
            for line in self.reader.take_all():
                self._match(line)
            self.stats.requests += 1
            try:
                await self.port.write(self._request)
            except TransportError as exc:
                return self._failed("link", str(exc))
            deadline = time.monotonic() + self.timeout
            while True:
                remaining = deadline - time.monotonic()
                try:
                    line = await asyncio.wait_for(self.reader.get(), max(0.0, remaining))
                except TimeoutError:
                    kind = "no_response" if self.port.connected else "link"
                    return self._failed(kind, f"no matching line within {self.timeout:g}s")
                match = self._match(line)
                if match is not None:
                    return self._succeeded(match, line)

    async def poll_stream(self) -> bool:
        """Publish the latest matching line since the last poll, or wait `timeout` for one."""
        self.stats.polls += 1
        if self._latest is None:
            self._fresh.clear()
            try:
                async with asyncio.timeout(self.timeout):  # never drops a cancel, unlike wait_for
                    await self._fresh.wait()
            except TimeoutError:
                kind = "no_response" if self.port.connected else "link"
                return self._failed(kind, f"no matching line within {self.timeout:g}s")
        assert self._latest is not None
        (match, line), self._latest = self._latest, None
        return self._succeeded(match, line)

    async def listen(self) -> None:
        """Streaming mode: keep the latest matching line for the next poll."""
        while True:
            line = await self.reader.get()
            match = self._match(line)
            if match is None:
                continue
            if self._latest is not None:
                self.stats.superseded += 1
            self._latest = (match, line)
            self._fresh.set()

    def _match(self, line: Line) -> re.Match[str] | None:
        self.stats.lines += 1
        text = line.data.decode(ENCODING)
        match = self._regex.search(text)
        if match is None:
            self.stats.unmatched += 1
            self._log.debug("line does not match response", line=text)
        return match

    def _succeeded(self, match: re.Match[str], line: Line) -> bool:
        values: dict[str, Value] = {}
        for name, point in self._points.items():
            text = match.group(name)
            if text is None:
                continue  # an optional group the instrument left out this time
            try:
                values[name] = engineering(point, parse_text(point, text))
            except ValueError as exc:  # a text that is not the point's type, or NaN (BadValue)
                self.stats.bad_values += 1
                self._log.debug("bad value in line", point=name, text=text, error=str(exc))
        self.last_values = values
        if values:
            self.emit(self._outbox.messages(values, line.ts, time.monotonic()))
        self.status.succeeded()
        return True

    def _failed(self, kind: str, reason: str) -> bool:
        self.stats.count_failure(kind)
        self.stats.failed_polls += 1
        self.status.failed(reason)
        return False
