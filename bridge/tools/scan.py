"""`m2m-bridge scan`: which unit ids answer on a link.

Each unit is asked for one holding register (FC3 at address 0). Any reply is a device: the
register, or a Modbus exception (02 when address 0 is not mapped, 01 when it has no holding
registers); silence is no device. Exceptions 0A/0B come from a TCP gateway saying the unit
behind it did not answer, so they count as absent too.

The requests go through the same link as the daemon's polls (bridge.transports.link): one
transaction at a time, the inter-frame silence on serial lines, and after each timeout the
settle that lets a late reply die out before the next unit is asked. A dead unit on a serial
line therefore costs its timeout plus that settle (50 ms, or 40 characters on slow lines).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bridge.core.bustime import silence
from bridge.core.planner import ReadRequest
from bridge.errors import DeviceError, UsageError
from bridge.tools.oneshot import parse_url
from bridge.transports.link import Link
from bridge.transports.modbus import ModbusClient
from bridge.transports.modbus_errors import EXCEPTION_NAMES, BadFrame, NoResponse

MAX_UNIT = 247  # 0 is broadcast (nobody answers), 248-255 are reserved
GATEWAY_NO_TARGET = (10, 11)  # "gateway path unavailable", "target device failed to respond"
PROBE = ReadRequest(table="holding", address=0, count=1, points=(), layout=None)


def progress_bar(total: int) -> Any:
    """A tqdm bar on stderr when it is a terminal; None otherwise (pipes, logs, tests)."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm  # type: ignore[import-untyped]  # noqa: PLC0415 - only on a tty

    return tqdm(total=total, unit="unit", file=sys.stderr, leave=False)


def parse_units(text: str) -> list[int]:
    """`1-10,20,30-32` -> the unit ids in order, each once; a UsageError naming what is wrong."""
    units: dict[int, None] = {}
    for part in text.split(","):
        piece = part.strip()
        low, dash, high = piece.partition("-")
        try:
            first = int(low)
            last = int(high) if dash else first
        except ValueError:
            raise UsageError(f"--units {text!r}: {piece!r} is not a unit id or a range "
                             "such as 1-10") from None
        if not 1 <= first <= last <= MAX_UNIT:
            raise UsageError(f"--units {text!r}: {piece!r} must lie within 1-{MAX_UNIT}, "
                             "low to high")
        units.update(dict.fromkeys(range(first, last + 1)))
    return list(units)


@dataclass(frozen=True, slots=True)
class Answer:
    """A unit that answered, and with what."""

    unit: int
    answer: str  # "registers", "exception 02 (illegal data address)", "garbled reply"
    seconds: float  # the transaction, as the client saw it

    def as_json(self) -> dict[str, object]:
        return {"unit": self.unit, "answer": self.answer, "ms": round(self.seconds * 1000, 1)}


@dataclass(frozen=True, slots=True)
class ScanResult:
    found: list[Answer]
    probed: int
    seconds: float


Progress = Callable[[int, Answer | None], None]


async def scan(
    url: str,
    *,
    units: list[int],
    timeout: float,  # noqa: ASYNC109 - the link's per-request timeout, passed to pymodbus
    progress: Progress | None = None,
) -> ScanResult:
    """Ask each of `units` in turn; `progress(unit, answer or None)` after each."""
    endpoint = parse_url(url, timeout=timeout)
    quiet = silence(endpoint.baudrate) if endpoint.is_serial else 0.0
    link = Link(ModbusClient(endpoint, backoff_cap=0), silence=quiet)
    found: list[Answer] = []
    started = time.monotonic()
    try:
        for unit in units:
            answer = await _ask(link, unit)
            if answer is not None:
                found.append(answer)
            if progress is not None:
                progress(unit, answer)
    finally:
        link.close()
    return ScanResult(found, len(units), time.monotonic() - started)


async def _ask(link: Link, unit: int) -> Answer | None:
    """What `unit` answered, or None for silence. A link that fails (refused, port gone)
    raises TransportError: the rest of the scan would only say the same thing."""
    began = time.monotonic()
    try:
        await link.read(unit, PROBE)
    except NoResponse:
        return None
    except BadFrame:
        # Bytes came back, not a frame: something is there (or two units share the id).
        return Answer(unit, "garbled reply", time.monotonic() - began)
    except DeviceError as exc:
        if exc.code is None:
            return Answer(unit, "unusable reply", time.monotonic() - began)
        if exc.code in GATEWAY_NO_TARGET:
            return None
        name = EXCEPTION_NAMES.get(exc.code, "unknown exception")
        return Answer(unit, f"exception {exc.code:02d} ({name})", time.monotonic() - began)
    return Answer(unit, "registers", time.monotonic() - began)
