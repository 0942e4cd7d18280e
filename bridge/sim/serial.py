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
import re
import select
import struct
import tempfile
import threading
import time
import tty
import warnings
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from bridge.config import Config, Device, LineLink, Point, SerialLink
from bridge.core import bustime
from bridge.core.codec import Value
from bridge.sim.tcp import DeviceStore, Simulator

with warnings.catch_warnings():  # sre_parse is the documented-enough parser of re's syntax
    warnings.simplefilter("ignore", DeprecationWarning)
    import sre_constants as sc
    import sre_parse

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


# --- Modbus -----------------------------------------------------------------------------------


def crc16(data: bytes) -> int:
    """Modbus RTU CRC-16 (polynomial 0xA001 reflected, initial 0xFFFF)."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def with_crc(frame: bytes) -> bytes:
    return frame + struct.pack("<H", crc16(frame))


def lrc(data: bytes) -> int:
    """Modbus ASCII LRC: two's complement of the byte sum."""
    return (-sum(data)) & 0xFF


def _exception(fc: int, code: int) -> bytes:
    return bytes([fc | 0x80, code])


def answer_pdu(store: DeviceStore, pdu: bytes) -> bytes:
    """The response PDU to a request PDU, from and to `store`'s tables."""
    fc = pdu[0]
    try:
        if fc in (1, 2, 3, 4):
            address, count = struct.unpack_from(">HH", pdu, 1)
            bits = fc in (1, 2)
            if not 1 <= count <= (2000 if bits else 125):
                return _exception(fc, 3)
            if address + count > 65536:
                return _exception(fc, 2)
            if bits:
                values = store.tables["coil" if fc == 1 else "discrete"][address : address + count]
                packed = bytearray((count + 7) // 8)
                for i, bit in enumerate(values):
                    packed[i // 8] |= (bit & 1) << (i % 8)
                return bytes([fc, len(packed)]) + packed
            words = store.tables["holding" if fc == 3 else "input"][address : address + count]
            return bytes([fc, 2 * count]) + struct.pack(f">{count}H", *words)
        if fc in (5, 6):
            address, value = struct.unpack_from(">HH", pdu, 1)
            store.write_requests += 1
            if fc == 5:
                if value not in (0x0000, 0xFF00):
                    return _exception(fc, 3)
                store.tables["coil"][address] = int(value == 0xFF00)
                store.written["coil"].add(address)
            else:
                store.tables["holding"][address] = value
                store.written["holding"].add(address)
            return pdu[:5]
        if fc in (15, 16):
            address, count, size = struct.unpack_from(">HHB", pdu, 1)
            data = pdu[6 : 6 + size]
            if len(data) != size or address + count > 65536:
                return _exception(fc, 3 if len(data) != size else 2)
            store.write_requests += 1
            if fc == 15:
                for i in range(count):
                    store.tables["coil"][address + i] = (data[i // 8] >> (i % 8)) & 1
                store.written["coil"].update(range(address, address + count))
            else:
                new = array("H", struct.unpack(f">{count}H", data[: 2 * count]))
                store.tables["holding"][address : address + count] = new
                store.written["holding"].update(range(address, address + count))
            return pdu[:5]
    except (struct.error, IndexError):
        return _exception(fc, 3)
    return _exception(fc, 1)


class Protocol:
    """What plays the devices of one link: frame requests, answer them, stream on its own."""

    period: float | None = None  # seconds between streamed lines; None: speak when asked

    def length(self, buffer: bytes) -> int | None:
        """Bytes of the complete request at the start of `buffer`; None: wait for more; 0: no
        request can start here (dropped once the line goes quiet)."""
        raise NotImplementedError

    def answer(self, request: bytes) -> bytes | None:
        raise NotImplementedError

    def stream(self) -> bytes | None:
        return None

    def tick(self) -> None:
        """Let simulated values wander (line instruments; registers tick in Simulator)."""


class RtuSlaves(Protocol):
    """Modbus RTU units on one line."""

    def __init__(self, units: dict[int, DeviceStore]) -> None:
        self.units = units
        self.bad_frames = 0

    def length(self, buffer: bytes) -> int | None:
        if len(buffer) < 2:
            return None
        fc = buffer[1]
        if fc in (1, 2, 3, 4, 5, 6):
            size = 8
        elif fc in (15, 16):
            if len(buffer) < 7:
                return None
            size = 9 + buffer[6]
        else:
            return 0
        return size if len(buffer) >= size else None

    def answer(self, request: bytes) -> bytes | None:
        if struct.unpack("<H", request[-2:])[0] != crc16(request[:-2]):
            self.bad_frames += 1
            return None  # a real slave ignores a frame with a bad CRC: the master times out
        unit, pdu = request[0], request[1:-2]
        if unit == 0:  # broadcast: every unit acts, none answers
            for each in self.units.values():
                answer_pdu(each, pdu)
            return None
        store = self.units.get(unit)
        return None if store is None else with_crc(bytes([unit]) + answer_pdu(store, pdu))


class AsciiSlaves(RtuSlaves):
    """Modbus ASCII units on one line: `:` hex LRC CR LF."""

    def length(self, buffer: bytes) -> int | None:
        if not buffer.startswith(b":"):
            return 0
        end = buffer.find(b"\n")
        return None if end < 0 else end + 1

    def answer(self, request: bytes) -> bytes | None:
        try:
            raw = bytes.fromhex(request[1:].strip().decode("ascii"))
        except ValueError:
            raw = b""
        if len(raw) < 3 or lrc(raw[:-1]) != raw[-1]:
            self.bad_frames += 1
            return None
        unit, pdu = raw[0], raw[1:-1]
        if unit == 0:
            for each in self.units.values():
                answer_pdu(each, pdu)
            return None
        store = self.units.get(unit)
        if store is None:
            return None
        reply = bytes([unit]) + answer_pdu(store, pdu)
        return b":" + (reply + bytes([lrc(reply)])).hex().upper().encode() + b"\r\n"


# --- line instruments -------------------------------------------------------------------------


def example_line(pattern: str, groups: dict[str, str]) -> str:
    """A string `pattern` matches, with the named groups given in `groups` filled in as given
    (others from their own sub-pattern). Takes the shortest way through every construct."""
    compiled = re.compile(pattern)
    names = {number: name for name, number in compiled.groupindex.items()}
    out: list[str] = []
    _emit(sre_parse.parse(pattern), names, groups, out)
    return "".join(out)


def _emit(
    parsed: Any,  # sre_parse.SubPattern: (opcode, argument) pairs whose types vary by opcode
    names: dict[int, str],
    groups: dict[str, str],
    out: list[str],
) -> bool:
    """Append an example of `parsed` to `out`; whether it filled in any of `groups`."""
    filled = False
    for op, av in parsed:
        if op is sc.LITERAL:
            out.append(chr(av))
        elif op is sc.NOT_LITERAL:
            out.append("x" if av != ord("x") else "y")
        elif op is sc.ANY:
            out.append("x")
        elif op is sc.IN:
            out.append(_one_of(av))
        elif op in (sc.MAX_REPEAT, sc.MIN_REPEAT, getattr(sc, "POSSESSIVE_REPEAT", None)):
            low, _, sub = av
            once: list[str] = []
            # An optional part holding a value we want shown is taken once, else skipped.
            used = _emit(sub, names, groups, once)
            filled |= used
            out.extend(once * max(low, int(used)))
        elif op is sc.SUBPATTERN:
            number, _, _, sub = av
            name = names.get(number)
            if name is not None and name in groups:
                out.append(groups[name])
                filled = True
            else:
                filled |= _emit(sub, names, groups, out)
        elif op is sc.BRANCH:
            _, branches = av
            filled |= _emit(branches[0], names, groups, out)
        elif op is sc.ATOMIC_GROUP:
            filled |= _emit(av, names, groups, out)
        # AT (anchors), ASSERT, ASSERT_NOT, GROUPREF...: contribute no characters here
    return filled


_CATEGORY_CHAR: dict[object, str] = {
    sc.CATEGORY_DIGIT: "0", sc.CATEGORY_SPACE: " ", sc.CATEGORY_WORD: "a",
    sc.CATEGORY_NOT_DIGIT: "x", sc.CATEGORY_NOT_SPACE: "x", sc.CATEGORY_NOT_WORD: " ",
}


def _one_of(items: Any) -> str:
    negate = bool(items) and items[0][0] is sc.NEGATE
    if negate:
        excluded = {chr(av) for op, av in items if op is sc.LITERAL}
        return next(c for c in "xa0_- " if c not in excluded)
    for op, av in items:
        if op is sc.LITERAL:
            return chr(av)
        if op is sc.RANGE:
            return chr(av[0])
        if op is sc.CATEGORY:
            return _CATEGORY_CHAR.get(av, "x")
    return "x"


def _candidates(point: Point, value: Value) -> list[str]:
    """Ways an instrument might print `value` (engineering) for `point`, raw, most likely first."""
    if point.type == "string":
        return [str(value), "SIM"]
    if point.type == "bool":
        on = bool(value)
        return [*(a if on else b for a, b in
                  (("1", "0"), ("Y", "N"), ("true", "false"), ("ON", "OFF"), ("T", "F")))]
    raw = (float(value) - point.offset) / (point.scale or 1.0)
    if point.type.startswith(("int", "uint")):
        number = round(raw)
        return [str(number), f"{number:+d}", f"{number:05d}"]
    first = point.precision if point.precision is not None else 2
    texts = [f"{raw:.{d}f}" for d in dict.fromkeys((first, 1, 2, 3, 4, 0))]
    return texts + [f"{raw:+.{d}f}" for d in dict.fromkeys((first, 1, 2, 3, 4, 0))]


@dataclass
class _SimValue:
    point: Point
    value: Value
    center: float | None
    drift: float


class LineInstrument:
    """One configured line instrument: its request, and response lines with living values."""

    def __init__(self, device: Device, rng: random.Random) -> None:
        assert device.response is not None
        self.device = device
        self.regex = re.compile(device.response)
        self.request = None if device.request is None else device.request.encode("latin-1")
        self.eol = device.eol.encode("latin-1")
        self._rng = rng
        self.values: dict[str, _SimValue] = {}
        for point in device.points:
            if point.name not in self.regex.groupindex:
                continue
            hint = point.simulate
            value: Value
            if hint is not None and hint.value is not None:
                value = hint.value
            elif point.type == "bool":
                value = True
            elif point.type == "string":
                value = "SIM"
            else:
                value = 100 * point.scale + point.offset
            numeric = isinstance(value, int | float) and not isinstance(value, bool)
            drift = hint.drift if hint is not None else 0.0
            center = float(value) if numeric and drift > 0 else None
            self.values[point.name] = _SimValue(point, value, center, drift)

    def line(self) -> bytes:
        """A response line for the current values, checked against the regex."""
        chosen: dict[str, str] = {}
        for name, sim in self.values.items():
            options = _candidates(sim.point, sim.value)
            chosen[name] = options[0]
            for text in options:
                trial = example_line(self.regex.pattern, {**chosen, name: text})
                match = self.regex.search(trial)
                if match is not None and match.group(name) == text:
                    chosen[name] = text
                    break
            else:  # no way of printing the value fits the group: let the group print itself
                del chosen[name]
        text = example_line(self.regex.pattern, chosen)
        if self.regex.search(text) is None:
            log.warning("simulate: cannot build a line matching response", device=self.device.name)
        return text.encode("latin-1", errors="replace") + self.eol

    def tick(self) -> None:
        for sim in self.values.values():
            if sim.center is None:
                continue
            step = self._rng.uniform(-sim.drift, sim.drift) / 4
            current = float(sim.value)
            sim.value = min(max(current + step, sim.center - sim.drift), sim.center + sim.drift)


class LineInstruments(Protocol):
    """The line instruments of one `serial` link."""

    def __init__(self, instruments: list[LineInstrument]) -> None:
        self.asked = [i for i in instruments if i.request is not None]
        self.streaming = [i for i in instruments if i.request is None]
        if self.streaming:
            self.period = min(i.device.interval for i in self.streaming)
        self.unknown = 0

    def length(self, buffer: bytes) -> int | None:
        for inst in self.asked:
            assert inst.request is not None
            if buffer.startswith(inst.request):
                return len(inst.request)
            if inst.request.startswith(buffer):
                return None
        for inst in self.asked:  # not a request we know: skip up to its end, if it has one
            end = buffer.find(inst.eol)
            if end >= 0:
                self.unknown += 1
                return -(end + len(inst.eol))
        return 0

    def answer(self, request: bytes) -> bytes | None:
        for inst in self.asked:
            if request == inst.request:
                return inst.line()
        return None

    def stream(self) -> bytes | None:
        return b"".join(inst.line() for inst in self.streaming) or None

    def tick(self) -> None:
        for inst in [*self.asked, *self.streaming]:
            inst.tick()


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
            link = config.link(device.link)
            if isinstance(link, LineLink):
                instruments.setdefault(link.name, []).append(LineInstrument(device, rng))
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
