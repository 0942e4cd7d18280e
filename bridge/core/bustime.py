"""Serial-line timing (Modbus over Serial Line v1.02, 2.5.1.1): one place for the numbers.

The transports wait these times, the planner's report prices requests with them and the
simulator paces its ptys by them, so all three agree on what a line can carry.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

from bridge.core.planner import PollGroup, ReadRequest

if TYPE_CHECKING:  # annotations only: the transports need these times without pydantic's models
    from bridge.config import SerialLink

BITS_PER_CHAR = 11  # RTU: start + 8 data + parity (or a 2nd stop) + stop
FAST_LINE_SILENCE = 0.00175  # the spec's fixed 1.75 ms above 19200 baud


def char_time(baudrate: int, bits: int = BITS_PER_CHAR) -> float:
    """Seconds one character takes on the line."""
    return bits / baudrate


def silence(baudrate: int, bits: int = BITS_PER_CHAR) -> float:
    """Inter-frame silence: 3.5 characters, fixed at 1.75 ms above 19200 baud."""
    return FAST_LINE_SILENCE if baudrate > 19200 else 3.5 * char_time(baudrate, bits)


RTU_REQUEST_BYTES = 8  # unit, function, address(2), count(2), CRC(2)
RTU_REPLY_OVERHEAD = 5  # unit, function, byte count, CRC(2)


def rtu_seconds(request: ReadRequest, baudrate: int) -> float:
    """Bus time of one RTU read: both frames on the wire plus the silence after each."""
    data = math.ceil(request.count / 8) if request.is_bits else 2 * request.count
    frame_bytes = RTU_REQUEST_BYTES + RTU_REPLY_OVERHEAD + data
    return frame_bytes * BITS_PER_CHAR / baudrate + 2 * silence(baudrate)


def ascii_seconds(request: ReadRequest, baudrate: int) -> float:
    """Bus time of one Modbus ASCII read: every byte is two hex characters, plus ':', LRC, CRLF.

    ASCII has no silence rule (frames are delimited), so none is added; 11 bits a character is
    kept, which slightly overestimates 7-bit framings: this feeds a warning, better early.
    """
    data = math.ceil(request.count / 8) if request.is_bits else 2 * request.count
    request_chars = 1 + 2 * 6 + 2 + 2  # ':' unit fc addr(2) count(2) as hex, LRC, CRLF
    reply_chars = 1 + 2 * (3 + data) + 2 + 2  # ':' unit fc bytecount data as hex, LRC, CRLF
    return (request_chars + reply_chars) * BITS_PER_CHAR / baudrate


def bus_seconds(request: ReadRequest, link: SerialLink) -> float:
    """Bus time of one read on a serial link, its `request_delay` included."""
    if link.type == "ascii":
        return ascii_seconds(request, link.baudrate) + link.request_delay
    return rtu_seconds(request, link.baudrate) + link.request_delay


def bus_load(link: SerialLink, plans: Iterable[Iterable[PollGroup]]) -> float:
    """Fraction of the line's time the devices' plans need (1.0 = the line is full)."""
    return sum(
        bus_seconds(request, link) / group.interval
        for plan in plans
        for group in plan
        for request in group.requests
        if group.interval > 0
    )
