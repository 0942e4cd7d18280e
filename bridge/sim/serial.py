"""Serial devices for `m2m-bridge simulate`: RTU/ASCII slaves and line instruments on ptys.

Each simulated serial link is one pseudo-terminal. Its slave end is what a user (or the bridge)
opens, through a symlink named after the link in a private temp directory; this module keeps
the master end and plays every device configured on the link behind it.

A plain pty moves bytes instantly whatever baud rate is set on it, which would make every
serial timing question (bus utilisation, timeouts, a dead slave's cost) meaningless. So with
`baud` set, the far end behaves like a real line: each character takes `char_bits / baud`
seconds (start + data + parity + stop bits, 11 for RTU's 8E1/8N2), a frame is followed by the
serial-line spec's silence (3.5 characters, fixed 1.75 ms above 19200 baud), then the slave's
`turnaround` before it starts its reply, which is itself written out character by character
on schedule. The line is modelled as one shared medium: a request the client sends before the
previous reply plus its trailing silence has cleared the wire starts only after it, so no
client can beat the bus.

The slave is our own (no pymodbus server behind a relay): the timing model needs to know
where frames start and end, and pymodbus's server adds its own, unmodelled waits. RTU and
ASCII requests for FC 1-6, 15 and 16 are answered from the Simulator's register tables, so
`tick`, `set_value` and writes behave as for TCP devices.

Line instruments answer their `request` with a line their own `response` regex matches,
built from the regex itself with each named group replaced by the point's simulated value;
instruments with no `request` stream such a line every `interval`.

Each link runs in its own thread with blocking I/O and `time.sleep`: asyncio's timers wake
up to a millisecond late (epoll's resolution), which at 19200 baud is 5-10% of a small
transaction, and the timing is the point.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import select
import tempfile
import threading
import time
import tty
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from bridge.config import Config, LineLink, SerialLink
from bridge.core import bustime
from bridge.sim.frames import AsciiSlaves, Protocol, RtuSlaves, crc16, lrc, with_crc
from bridge.sim.instruments import LineInstrument, LineInstruments, example_line
from bridge.sim.tcp import Simulator
from bridge.transports.links import line_link

__all__ = ["SerialSimulator", "crc16", "example_line", "lrc", "with_crc"]

log = structlog.get_logger(__name__)

GAP = 0.02  # bytes that form no known frame are dropped after this much quiet, like a UART
CHUNK = 0.002  # a paced reply is written in pieces of about this much wire time


# --- timing ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Timing:
    """How long things take on the simulated wire; all zero when not pacing."""

    char_time: float = 0.0
    silence: float = 0.0
    turnaround: float = 0.0

    @classmethod
    def for_link(
        cls, link: SerialLink | LineLink, baud: int | None, turnaround: float = 0.0
    ) -> Timing:
        if baud is None:
            return cls()
        bits = 1 + link.bytesize + (link.parity != "N") + link.stopbits
        return cls(bustime.char_time(baud, bits), bustime.silence(baud, bits), turnaround)


# --- the pty and its pacing -------------------------------------------------------------------


class SerialLine:
    """One simulated link: a pty for the client, the devices behind a paced wire, one thread."""

    def __init__(self, name: str, kind: str, path: Path, protocol: Protocol, timing: Timing):
        self.name = name
        self.kind = kind
        self.path = path
        self.protocol = protocol
        self.timing = timing
        self.transactions = 0
        self.line_free_at = 0.0
        self._master, self._slave = os.openpty()
        # Raw: no echo, no CR/LF translation, no line buffering; bytes are bytes. The slave end
        # stays open here too, so the master never sees a hangup between two client sessions.
        tty.setraw(self._slave)
        os.set_blocking(self._master, False)
        path.unlink(missing_ok=True)
        path.symlink_to(os.ttyname(self._slave))
        self._wake_r, self._wake_w = os.pipe()
        self._stop = False
        self._thread = threading.Thread(target=self._serve, name=f"serial {name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        os.write(self._wake_w, b"x")
        if self._thread.ident is not None:  # a start that failed elsewhere still cleans up
            self._thread.join(5)
        for fd in (self._master, self._slave, self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.path.unlink(missing_ok=True)

    def _serve(self) -> None:
        buffer = b""
        first_at = last_at = 0.0
        period = self.protocol.period
        next_stream = time.monotonic() + period if period else None
        while not self._stop:
            now = time.monotonic()
            waits = [GAP if buffer else None, (next_stream - now) if next_stream else None]
            timeout = min((w for w in waits if w is not None), default=None)
            ready, _, _ = select.select([self._master, self._wake_r], [], [],
                                        None if timeout is None else max(0.0, timeout))
            now = time.monotonic()
            if self._master in ready:
                data = self._read()
                if data:
                    if not buffer:
                        first_at = now
                    buffer += data
                    last_at = now
            buffer, first_at = self._requests(buffer, first_at, now - last_at > GAP)
            if next_stream is not None and period and now >= next_stream:
                line = self.protocol.stream()
                if line:
                    self._send(line, max(now, self.line_free_at))
                next_stream += period * max(1, int((now - next_stream) / period) + 1)

    def _read(self) -> bytes:
        try:
            return os.read(self._master, 4096)
        except BlockingIOError:
            return b""
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            time.sleep(0.01)  # EIO: no client has the line open right now
            return b""

    def _requests(self, buffer: bytes, first_at: float, quiet: bool) -> tuple[bytes, float]:
        while buffer:
            size = self.protocol.length(buffer)
            if size is None:
                if quiet:  # a frame that never completed: a real slave drops it too
                    return b"", 0.0
                break
            if size <= 0:
                if size == 0 and not quiet:
                    break
                buffer = buffer[-size:] if size < 0 else b""
                continue
            frame, buffer = buffer[:size], buffer[size:]
            self._transact(frame, first_at)
            first_at = time.monotonic()
        return buffer, first_at

    def _transact(self, request: bytes, arrived: float) -> None:
        t = self.timing
        start = max(arrived, self.line_free_at)  # the wire carries one frame at a time
        request_end = start + len(request) * t.char_time
        reply = self.protocol.answer(request)
        self.transactions += 1
        if reply is None:
            self.line_free_at = request_end + t.silence
            return
        self._send(reply, request_end + t.silence + t.turnaround)

    def _send(self, data: bytes, start: float) -> None:
        """Put `data` on the wire from `start`: each character arrives when its last bit has."""
        t = self.timing
        if t.char_time == 0:
            self._write(data)
            self.line_free_at = time.monotonic()
            return
        per_chunk = max(1, int(CHUNK / t.char_time))
        for begin in range(0, len(data), per_chunk):
            end = min(len(data), begin + per_chunk)
            _sleep_until(start + end * t.char_time)
            self._write(data[begin:end])
        self.line_free_at = start + len(data) * t.char_time + t.silence

    def _write(self, data: bytes) -> None:
        # Nobody reads this line and its buffer is full: the wire drops it, as a real one would.
        with contextlib.suppress(BlockingIOError):
            os.write(self._master, data)


def _sleep_until(deadline: float) -> None:
    delay = deadline - time.monotonic()
    if delay > 0:
        time.sleep(delay)


class SerialSimulator:
    """Every rtu/ascii/serial link of a config, each on its own pty under `directory`."""

    def __init__(
        self,
        config: Config,
        sim: Simulator,
        *,
        baud: int | Callable[[SerialLink | LineLink], int] | None = None,
        turnaround: float = 0.0,
        directory: Path | None = None,
        seed: int | None = None,
    ) -> None:
        self.directory = directory or Path(tempfile.mkdtemp(prefix="m2m-sim-"))
        self.directory.mkdir(parents=True, exist_ok=True)
        self.lines: dict[str, SerialLine] = {}
        rng = random.Random(seed)
        instruments: dict[str, list[LineInstrument]] = {}
        for device in config.devices:
            line = line_link(config, device)
            if line is not None:
                instruments.setdefault(line.name, []).append(LineInstrument(device, rng))
        for link in config.links:
            protocol: Protocol
            if isinstance(link, SerialLink) and link.name in sim.serial_units:
                units = sim.serial_units[link.name]
                protocol = RtuSlaves(units) if link.type == "rtu" else AsciiSlaves(units)
            elif isinstance(link, LineLink) and link.name in instruments:
                protocol = LineInstruments(instruments[link.name])
            else:
                continue
            rate = baud(link) if callable(baud) else baud
            timing = Timing.for_link(link, rate, turnaround)
            self.lines[link.name] = SerialLine(
                link.name, link.type, self.directory / link.name, protocol, timing
            )

    def start(self) -> None:
        for line in self.lines.values():
            line.start()

    def tick(self) -> None:
        for line in self.lines.values():
            line.protocol.tick()

    def stop(self) -> None:
        for line in self.lines.values():
            line.stop()
        with contextlib.suppress(OSError):
            self.directory.rmdir()

    def announcements(self) -> list[str]:
        """One line per link, telling the user where to point the config's `port`."""
        return [
            f"{line.kind} link {name}: connect to {line.path}"
            for name, line in self.lines.items()
        ]
