"""What a device says it is: Read Device Identification (FC43/14) and Report Server ID (FC17).

Both go through the link's scheduler and the client's transaction (`ModbusClient._call`), so they
keep the line's pace, the settle after a timeout and the error mapping of every other request:
a device that refuses answers a `DeviceError` with its exception `code`, a silent one
`NoResponse`. Replies come back as plain types; pymodbus stays behind this wall.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pymodbus.exceptions import ModbusIOException
from pymodbus.pdu import ModbusPDU
from pymodbus.pdu.other_message import ReportDeviceIdRequest

from bridge.errors import DeviceError
from bridge.transports.link import Link, Priority
from bridge.transports.modbus import AnyClient

# Read Device ID codes (Modbus Application Protocol v1.1b3, 6.21): stream access to the basic
# (objects 0-2), regular (0-6) and extended (0-255) categories.
READ_BASIC, READ_REGULAR, READ_EXTENDED = 1, 2, 3
OBJECT_NAMES = {
    0x00: "VendorName",
    0x01: "ProductCode",
    0x02: "MajorMinorRevision",
    0x03: "VendorUrl",
    0x04: "ProductName",
    0x05: "ModelName",
    0x06: "UserApplicationName",
}
MAX_FOLLOWS = 64  # "more follows" rounds before a device is taken to loop for ever
_REFUSED_CATEGORY = (2, 3)  # illegal data address / value: this read code is not supported


@dataclass(slots=True)
class Identification:
    """The objects a device returned, by id, and the conformity level it claims."""

    objects: dict[int, bytes] = field(default_factory=dict)
    conformity: int = 0
    read_code: int = READ_EXTENDED  # the category that was read
    requests: int = 0


def object_name(object_id: int) -> str:
    """The spec's name of an object id, or `0xNN` for reserved and private ones."""
    return OBJECT_NAMES.get(object_id, f"0x{object_id:02X}")


async def read_device_identification(link: Link, unit: int) -> Identification:
    """Every object `unit` gives: the extended category, else regular, else basic (a device
    answers an unsupported category with exception 02 or 03), following "more follows"."""
    for code in (READ_EXTENDED, READ_REGULAR, READ_BASIC):
        try:
            return await _read_category(link, unit, code)
        except DeviceError as exc:
            if exc.code not in _REFUSED_CATEGORY or code == READ_BASIC:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


async def _read_category(link: Link, unit: int, read_code: int) -> Identification:
    found = Identification(read_code=read_code)
    next_id = 0
    for _ in range(MAX_FOLLOWS):
        reply = await _call(link, unit, f"read device identification {read_code}/{next_id}",
                            _fc43(read_code, next_id))
        found.requests += 1
        found.conformity = int(getattr(reply, "conformity", 0))
        for object_id, data in dict(getattr(reply, "information", {})).items():
            values = data if isinstance(data, list) else [data]
            for value in values:  # a repeated id (some devices send lists): keep them joined
                old = found.objects.get(int(object_id))
                found.objects[int(object_id)] = bytes(value) if old is None else old + b"; " + value
        more = int(getattr(reply, "more_follows", 0))
        following = int(getattr(reply, "next_object_id", 0))
        if not more or following <= next_id:
            return found  # done, or a device that would send the same part again
        next_id = following
    return found


def _fc43(read_code: int, object_id: int) -> Any:
    async def op(client: AnyClient, unit: int) -> Any:
        return await client.read_device_information(
            read_code=read_code, object_id=object_id, device_id=unit
        )

    return op


@dataclass(frozen=True, slots=True)
class ServerId:
    """A Report Server ID reply: its data (server id, run indicator, additional data; the
    layout after the byte count is device specific) and the run indicator where it is known."""

    data: bytes
    running: bool | None


class _ServerIdReply(ModbusPDU):
    """FC17's reply as its bytes. pymodbus' own class takes the last byte for the run
    indicator (its server's layout) and drops it from the data; the spec puts the run
    indicator second, so a real device's last character would be lost."""

    function_code = 0x11
    rtu_byte_count_pos = 2

    def __init__(self, dev_id: int = 1, transaction_id: int = 0) -> None:
        super().__init__(dev_id=dev_id, transaction_id=transaction_id)
        self.data = b""

    def encode(self) -> bytes:
        return bytes([len(self.data)]) + self.data

    def decode(self, data: bytes) -> None:
        count = data[0] if data else 0
        if not 1 <= count <= len(data) - 1:
            raise ModbusIOException(f"report server id: byte count {count} for {len(data)} bytes")
        self.data = bytes(data[1 : 1 + count])


async def report_server_id(link: Link, unit: int) -> ServerId:
    """FC17: the data after the byte count, and the run indicator if the layout is the spec's."""

    async def op(client: AnyClient, unit_: int) -> Any:
        client.register(_ServerIdReply)  # this client's decoder; idempotent
        return await client.execute(False, ReportDeviceIdRequest(dev_id=unit_))

    reply = await _call(link, unit, "report server id", op)
    data = bytes(getattr(reply, "data", b""))
    running: bool | None = None
    if len(data) >= 2 and data[1] in (0x00, 0xFF):
        running = data[1] == 0xFF  # the spec's layout: server id, run indicator, data
    return ServerId(data, running)


async def _call(link: Link, unit: int, what: str, op: Any) -> Any:
    async with link.scheduler.turn(Priority.POLL):
        # The client's one transaction path: pacing, settle, counters, error mapping.
        return await link.client._call(what, unit, lambda client: op(client, unit))
