"""Modbus RTU and ASCII slaves for the serial simulator: frames in, answers out.

`Protocol` is what plays the devices of one simulated line (bridge.sim.serial paces the bytes);
`RtuSlaves` and `AsciiSlaves` answer FC 1-6, 15 and 16 from the TCP simulator's register
tables, so `tick`, `set_value` and writes behave as for TCP devices, and FC43/14 and FC17 with
the device's identification (bridge.sim.identity), three objects a frame, as small devices do.
"""

from __future__ import annotations

import struct
from array import array

from bridge.sim.identity import (
    FC_IDENTIFY,
    FC_SERVER_ID,
    identification_reply,
    server_id_reply,
)
from bridge.sim.tcp import DeviceStore

OBJECTS_PER_FRAME = 3  # FC43 objects a simulated serial device sends a reply


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
        if fc == FC_IDENTIFY:
            return identification_reply(store.identity, pdu, objects_per_reply=OBJECTS_PER_FRAME)
        if fc == FC_SERVER_ID:
            return server_id_reply(store.unit, store.identity)
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
        elif fc == FC_IDENTIFY:
            size = 7  # unit, 0x2B, MEI type, read code, object id, CRC
        elif fc == FC_SERVER_ID:
            size = 4  # unit, 0x11, CRC
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
