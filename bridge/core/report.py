"""`m2m-bridge plan`: what the planner will ask each device for, and what it costs the bus."""

from __future__ import annotations

import math
from collections.abc import Iterable

from bridge.config import Config, SerialLink, TcpLink
from bridge.core.bustime import BITS_PER_CHAR, silence
from bridge.core.planner import PollGroup, ReadRequest, plan_device, registers_spanned

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


def plan_report(config: Config) -> str:
    """Requests per device and, for serial links, the bus time they take."""
    lines: list[str] = []
    total_requests = total_points = 0
    serial_plans: dict[str, list[tuple[PollGroup, ...]]] = {}
    for device in config.devices:
        link = config.link(device.link)
        if not isinstance(link, TcpLink | SerialLink):
            lines.append(f"{device.name}: line instrument on {link.name}, one request per poll")
            continue
        groups = plan_device(device.points, interval=device.interval,
                             max_registers=link.max_registers, max_gap=link.max_gap)
        requests = sum(len(g.requests) for g in groups)
        points = sum(1 for p in device.points if p.address is not None)
        total_requests += requests
        total_points += points
        lines.append(
            f"{device.name} (unit {device.unit} on {link.name}): {requests} requests per cycle "
            f"for {points} points, {registers_spanned(groups)} registers spanned"
        )
        for group in groups:
            for request in group.requests:
                cost = ""
                if isinstance(link, SerialLink):
                    cost = f"  ~{bus_seconds(request, link) * 1000:.1f} ms"
                names = ", ".join(p.name for p in request.points)
                lines.append(f"  every {group.interval:g}s  {request}{cost}  [{names}]")
        if isinstance(link, SerialLink):
            busy = bus_load(link, [groups])
            lines.append(f"  bus time: {busy * 100:.1f}% of {link.name} at {link.baudrate} baud")
            serial_plans.setdefault(link.name, []).append(groups)
    for name, plans in serial_plans.items():
        link = config.link(name)
        assert isinstance(link, SerialLink)
        lines.append(f"link {name}: the polls need {bus_load(link, plans) * 100:.1f}% of its "
                     f"bus time at {link.baudrate} baud")
    lines.append(f"total: {total_requests} requests per cycle instead of {total_points} "
                 f"(one per point)")
    return "\n".join(lines)
