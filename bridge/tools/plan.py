"""`m2m-bridge plan`: what the planner will ask each device for, and what it costs the bus."""

from __future__ import annotations

from bridge.config import Config, SerialLink
from bridge.core.bustime import bus_load, bus_seconds
from bridge.core.planner import PollGroup, plan_device, registers_spanned
from bridge.transports.links import modbus_link


def plan_report(config: Config) -> str:
    """Requests per device and, for serial links, the bus time they take."""
    lines: list[str] = []
    total_requests = total_points = 0
    serial_plans: dict[SerialLink, list[tuple[PollGroup, ...]]] = {}
    for device in config.devices:
        link = modbus_link(config, device)
        if link is None:
            lines.append(f"{device.name}: line instrument on {device.link}, one request per poll")
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
            serial_plans.setdefault(link, []).append(groups)
    for serial, plans in serial_plans.items():
        need = bus_load(serial, plans)
        lines.append(f"link {serial.name}: the polls need {need * 100:.1f}% of its "
                     f"bus time at {serial.baudrate} baud")
    lines.append(f"total: {total_requests} requests per cycle instead of {total_points} "
                 f"(one per point)")
    return "\n".join(lines)
