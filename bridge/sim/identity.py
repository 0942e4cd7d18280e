"""What a simulated device says it is: FC43/14 (Read Device Identification) and FC17 (Report
Server ID) replies, built from the device's (or its map's) `manufacturer` and `model`.

The reply PDUs are built here, byte for byte (Modbus Application Protocol v1.1b3, 6.21 and
6.13), for both simulators: the serial one sends them in its own frames; the TCP one serves them
through pymodbus request classes (`identity_pdus`) whose answers are these bytes. pymodbus'
own identification (ModbusDeviceIdentification) is one per process, read from a module-level
control block, so units on one simulated gateway could not differ.

`objects_per_reply` lets a simulated device answer a few objects a frame, as small devices
do, so a client has to follow "more follows" (the serial simulator sends three).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

from pymodbus.pdu import ExceptionResponse, ModbusPDU
from pymodbus.pdu.mei_message import ReadDeviceInformationRequest
from pymodbus.pdu.other_message import ReportDeviceIdRequest

from bridge import __version__

FC_IDENTIFY, MEI_READ_DEVICE_ID, FC_SERVER_ID = 0x2B, 0x0E, 0x11
CONFORMITY = 0x83  # basic, regular and extended; stream and individual access
MAX_OBJECT_BYTES = 253 - 7  # what one reply carries after its header (pymodbus leaves 247)
KEEP_READING = 0xFF
_CATEGORY_LAST = {1: 0x02, 2: 0x06, 3: 0xFF}  # read code -> last object id of its category
RUN_ON = 0xFF


def device_objects(name: str, manufacturer: str | None, model: str | None) -> dict[int, bytes]:
    """The identification objects of a simulated device (ASCII, as the spec asks)."""
    vendor = manufacturer or "m2m-bridge"
    product = model or "simulated device"
    objects = {
        0x00: vendor,
        0x01: product,
        0x02: __version__,
        0x04: f"{vendor} {product}",
        0x05: product,
        0x06: name,  # the user application name: the device's name in the config
        0x80: "simulated by m2m-bridge",  # a private object, read with the extended category
    }
    return {k: v.encode("ascii", "replace") for k, v in objects.items()}


def _exception(fc: int, code: int) -> bytes:
    return bytes([fc | 0x80, code])


def identification_reply(
    objects: Mapping[int, bytes], request: bytes, *, objects_per_reply: int = 255
) -> bytes:
    """The response PDU to an FC43 request PDU (function code included)."""
    if len(request) < 4 or request[1] != MEI_READ_DEVICE_ID:
        return _exception(FC_IDENTIFY, 1)
    read_code, object_id = request[2], request[3]
    if read_code == 4:  # one object, individually
        if object_id not in objects:
            return _exception(FC_IDENTIFY, 2)
        chosen = [object_id]
        more, following = 0, 0
    elif read_code in _CATEGORY_LAST:
        ids = [k for k in sorted(objects) if k <= _CATEGORY_LAST[read_code]]
        if object_id not in ids:
            object_id = 0  # the spec: an unknown start restarts the stream at 0
        rest = [k for k in ids if k >= object_id]
        chosen, space = [], MAX_OBJECT_BYTES
        for k in rest:
            if len(chosen) == objects_per_reply or 2 + len(objects[k]) > space:
                break
            chosen.append(k)
            space -= 2 + len(objects[k])
        left = rest[len(chosen):]
        more, following = (KEEP_READING, left[0]) if left else (0, 0)
    else:
        return _exception(FC_IDENTIFY, 3)
    body = b"".join(bytes([k, len(objects[k])]) + objects[k] for k in chosen)
    header = struct.pack(">BBBBBBB", FC_IDENTIFY, MEI_READ_DEVICE_ID, read_code, CONFORMITY,
                         more, following, len(chosen))
    return header + body


def server_id_reply(unit: int, objects: Mapping[int, bytes]) -> bytes:
    """The response PDU to FC17: byte count, server id (the unit), run indicator, then the
    vendor and product as additional data."""
    data = bytes([unit, RUN_ON]) + objects.get(0x00, b"") + b" " + objects.get(0x01, b"")
    return bytes([FC_SERVER_ID, len(data)]) + data


class _Raw(ModbusPDU):
    """A reply whose bytes are already made: pymodbus frames function_code + encode()."""

    def __init__(self, pdu: bytes) -> None:
        super().__init__()
        self.function_code = pdu[0]
        self._data = pdu[1:]

    def encode(self) -> bytes:
        return self._data


def identity_pdus(units: Mapping[int, Mapping[int, bytes]]) -> list[type[ModbusPDU]]:
    """pymodbus request classes (its `custom_pdu`) that answer FC43/14 and FC17 per unit."""

    def unknown(fc: int) -> ModbusPDU:
        return ExceptionResponse(fc, 0x0B)  # as pymodbus answers any request to a missing unit

    class Identify(ReadDeviceInformationRequest):
        def decode(self, data: bytes) -> None:
            super().decode(data)
            # pymodbus would look the sub-function up in its global table and swap this class
            # for its own; -1 says "no sub-function", so this class answers.
            self.sub_function_code = -1

        async def datastore_update(self, context: Any, device_id: int) -> ModbusPDU:
            objects = units.get(device_id)
            if objects is None:
                return unknown(FC_IDENTIFY)
            request = bytes([FC_IDENTIFY, MEI_READ_DEVICE_ID, self.read_code, self.object_id])
            return _Raw(identification_reply(objects, request))

    class ServerId(ReportDeviceIdRequest):
        async def datastore_update(self, context: Any, device_id: int) -> ModbusPDU:
            objects = units.get(device_id)
            if objects is None:
                return unknown(FC_SERVER_ID)
            return _Raw(server_id_reply(device_id, objects))

    return [Identify, ServerId]
