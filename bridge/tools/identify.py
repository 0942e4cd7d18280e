"""`m2m-bridge identify`: what a device says it is (FC43/14 and FC17), for one unit.

Both requests are made whatever the first one gave: many devices serve one and refuse the
other. A refusal (a Modbus exception) or a garbled reply is reported, not an error; the
command fails only when the unit did not answer at all (or the link itself failed).
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

from bridge.errors import DeviceError, UsageError
from bridge.tools.oneshot import parse_url
from bridge.tools.scan import GATEWAY_NO_TARGET, MAX_UNIT
from bridge.transports.identification import (
    object_name,
    read_device_identification,
    report_server_id,
)
from bridge.transports.link import Link
from bridge.transports.modbus import ModbusClient
from bridge.transports.modbus_errors import NoResponse

T = TypeVar("T")

_CATEGORIES = {1: "basic", 2: "regular", 3: "extended"}


@dataclass(slots=True)
class Identity:
    """What `identify` found out about one unit; `refused` says what it would not tell."""

    unit: int
    objects: dict[str, str] = field(default_factory=dict)
    category: str | None = None  # the FC43 category read: basic, regular or extended
    conformity: int | None = None
    server_id: str | None = None  # FC17 data as hex
    server_text: str | None = None  # its printable part
    running: bool | None = None
    refused: dict[str, str] = field(default_factory=dict)  # "FC43"/"FC17" -> why
    answered: bool = False

    def as_json(self) -> dict[str, object]:
        return {
            "unit": self.unit,
            "objects": self.objects,
            "category": self.category,
            "conformity": None if self.conformity is None else f"0x{self.conformity:02X}",
            "server_id": None if self.server_id is None else {
                "data": self.server_id, "text": self.server_text, "running": self.running,
            },
            "refused": self.refused,
        }

    def rows(self) -> list[tuple[str, str]]:
        """(name, value) lines for a table; refusals are said in one line each."""
        rows = list(self.objects.items())
        if self.category is not None:
            conformity = "" if self.conformity is None else f", conformity 0x{self.conformity:02X}"
            rows.append(("(category)", f"{self.category}{conformity}"))
        if self.server_id is not None:
            run = {True: "running", False: "stopped", None: "run state unknown"}[self.running]
            rows.append(("ServerId", f"{self.server_id} ({run})"))
            if self.server_text:
                rows.append(("ServerIdText", self.server_text))
        rows.extend((what, f"refused: {why}") for what, why in self.refused.items())
        return rows


def object_text(data: bytes) -> str:
    """Object bytes as text: the spec says ASCII; anything else shows as \\xNN."""
    return data.decode("ascii", errors="backslashreplace").rstrip("\x00 ")


def _printable(data: bytes) -> str:
    return "".join(chr(b) for b in data if 0x20 <= b < 0x7F).strip()


def _why(exc: DeviceError) -> str:
    """`unit 3: read …: Modbus exception 01 (illegal function)` -> the part after the label."""
    text = str(exc)
    at = text.find("Modbus exception")
    return text[at:] if at >= 0 else text.split(": ", 1)[-1]


async def _ask(call: Awaitable[T], what: str, found: Identity, silent: list[str]) -> T | None:
    """`call`'s reply, or None: a refusal is noted in `found` (the device answered), silence
    (or a gateway saying its target is silent) in `silent`."""
    try:
        reply = await call
    except NoResponse as exc:
        silent.append(str(exc))
        return None
    except DeviceError as exc:
        if exc.code in GATEWAY_NO_TARGET:
            silent.append(str(exc))
        else:
            found.answered = True
            found.refused[what] = _why(exc)
        return None
    found.answered = True
    return reply


async def identify(url: str, *, unit: int, timeout: float) -> Identity:  # noqa: ASYNC109
    """Ask `unit` at `url` for its identification and its server id."""
    endpoint = parse_url(url, timeout=timeout)
    if not 1 <= unit <= MAX_UNIT:
        raise UsageError(f"--unit {unit}: must be 1-{MAX_UNIT} (0 is broadcast: nobody answers)")
    link = Link(ModbusClient(endpoint, backoff_cap=0))
    found = Identity(unit)
    silent: list[str] = []
    try:
        ident = await _ask(read_device_identification(link, unit), "FC43", found, silent)
        if ident is not None:
            found.category = _CATEGORIES.get(ident.read_code)
            found.conformity = ident.conformity
            found.objects = {object_name(k): object_text(v)
                             for k, v in sorted(ident.objects.items())}
        server = await _ask(report_server_id(link, unit), "FC17", found, silent)
        if server is not None:
            found.server_id = server.data.hex(" ")
            found.server_text = _printable(server.data)
            found.running = server.running
    finally:
        link.close()
    if not found.answered:
        raise NoResponse(silent[0] if silent else f"unit {unit}: no answer")
    # A device that answered one and not the other: the silence is its way of refusing.
    for what, kind in (("FC43", found.category), ("FC17", found.server_id)):
        if kind is None and what not in found.refused:
            found.refused[what] = "no reply (not supported?)"
    return found
