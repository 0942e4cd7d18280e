"""One-off reads and writes through points, for the CLI: a configured device's points
(`read -c`, `write -c`), and a raw write to a URL, checked as the daemon checks a point's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import ValidationError

from bridge.config import Config, Device, LineLink, Point
from bridge.core.codec import BIT_TABLES, Table, Value
from bridge.core.messages import Message
from bridge.core.planner import plan_device
from bridge.core.scalefactors import LiveScales, normalize_all, with_factors
from bridge.core.writes import CommandRefused, parse_command
from bridge.errors import DeviceError, UsageError
from bridge.instrument import InstrumentPoller
from bridge.tools.oneshot import parse_byte_order, parse_point_type, parse_url, shortest
from bridge.transports.line import LinePort
from bridge.transports.link import Link
from bridge.transports.links import build_links, plan_for
from bridge.transports.modbus import ModbusClient
from bridge.transports.writestep import write_point


@dataclass(frozen=True, slots=True)
class PointReading:
    name: str
    value: Value
    unit: str | None


def _shown(point: Point, value: Value) -> Value:
    """A point's engineering value as the CLI prints it: `precision`, when set, has rounded it
    already; without it a float32 (scaled or not) shows no more digits than a float32 holds."""
    return value if point.precision is not None else shortest(point.type, value)


async def read_config_points(
    config: Config, device_name: str, names: Sequence[str]
) -> list[PointReading]:
    """Read `names` (default all) of a configured device once, scaled as the daemon would."""
    devices = {d.name: d for d in config.devices}
    if device_name not in devices:
        raise UsageError(f"no device {device_name!r} in the config "
                         f"(devices: {', '.join(devices) or 'none'})")
    device = devices[device_name]
    known = {p.name: p for p in device.points}
    missing = [n for n in names if n not in known]
    if missing:
        raise UsageError(f"device {device_name!r} has no point {missing[0]!r}")
    points = [known[n] for n in names] if names else list(device.points)
    line = config.link(device.link)
    if isinstance(line, LineLink):
        read = await read_instrument(config, device, line)
        return [PointReading(p.name, read[p.name], p.unit) for p in points if p.name in read]
    max_registers, max_gap = plan_for(config, device)
    # A point scaled from a factor read live needs the factor read with it.
    planned = [known[n] for n in with_factors(known, [p.name for p in points])]
    groups = plan_device(planned, interval=0, max_registers=max_registers, max_gap=max_gap)
    link = build_links(config.model_copy(update={"devices": [device]}))[device.link]
    readings: list[tuple[Point, Value]] = []
    try:
        for group in groups:
            for request in group.requests:
                words = await link.read(device.unit, request)
                readings += zip(request.points, request.decode(words), strict=True)
    finally:
        link.close()
    values: dict[str, Value] = {}
    live = LiveScales.of(planned)
    (normalize_all if live is None else live.normalize_all)(readings, values)
    for point in points:
        if point.name not in values:
            why = (f"its scale factor {point.scale_from!r} reads none (not implemented, or "
                   "outside -10..10)" if point.scale_from else "not a finite number")
            raise DeviceError(f"point {point.name!r} has no value: {why}")
    return [PointReading(p.name, _shown(p, values[p.name]), p.unit) for p in points]


async def read_instrument(config: Config, device: Device, link: LineLink) -> dict[str, Value]:
    """One reading of a line instrument: send `request` (or wait for a streamed line) and
    match `response`, exactly as its poller in the daemon does."""
    port = LinePort(link)
    poller = InstrumentPoller(device, port, config.mqtt, emit=_discard, set_status=_ignore)
    async with port.attached(poller.reader):
        if poller.streaming:
            async with asyncio.TaskGroup() as tg:
                listening = tg.create_task(poller.listen())
                ok = await poller.poll_stream()
                listening.cancel()
        else:
            ok = await poller.poll_request()
    if not ok:
        raise DeviceError(
            f"device {device.name!r}: no line matching `response` within {link.timeout:g}s "
            f"on {link.port}"
        )
    return poller.last_values


def _discard(_messages: list[Message]) -> None:
    """A one-off read prints what it read; it publishes nothing."""


def _ignore(_device: str, _online: bool) -> None:
    """Status is a daemon's business, not a one-off read's."""


async def write_url(
    url: str,
    *,
    unit: int,
    table: Table,
    address: int,
    type_: str | None,
    byte_order: str,
    value: str,
    timeout: float,  # noqa: ASYNC109 - the link's per-request timeout, passed to pymodbus
) -> Value:
    """Write `value` (command syntax, as on `/set`) at a raw address; return the read-back."""
    endpoint = parse_url(url, timeout=timeout)
    if table not in ("holding", "coil"):
        raise UsageError(f"--table {table}: only holding registers and coils can be written")
    kind = parse_point_type(type_, table)
    if table in BIT_TABLES and kind != "bool":
        raise UsageError(f"--type {kind}: coils hold bits; use --type bool")
    if kind == "string":
        raise UsageError("--type string: write strings through -c and a configured point")
    if not 0 <= unit <= 247:
        raise UsageError(f"--unit {unit}: must be 0-247")
    try:
        point = Point.model_validate({
            "name": "value", "table": table, "type": kind, "address": address,
            "byte_order": parse_byte_order(byte_order), "writable": True,
        })
    except ValidationError:
        raise UsageError(f"--address {address}: the write must stay within 0-65535") from None
    checked = _checked(point, value)
    link = Link(ModbusClient(endpoint, backoff_cap=0))
    try:
        return _shown(point, await write_point(link, unit, point, checked))
    finally:
        link.close()


async def write_config_point(
    config: Config, device_name: str, point_name: str, value: str
) -> PointReading:
    """Write `value` to a configured point with the daemon's checks; return the read-back."""
    devices = {d.name: d for d in config.devices}
    if device_name not in devices:
        raise UsageError(f"no device {device_name!r} in the config "
                         f"(devices: {', '.join(devices) or 'none'})")
    device = devices[device_name]
    point = next((p for p in device.points if p.name == point_name), None)
    if point is None:
        raise UsageError(f"device {device_name!r} has no point {point_name!r}")
    checked = _checked(point, value)
    link = build_links(config.model_copy(update={"devices": [device]}))[device.link]
    try:
        read = await write_point(link, device.unit, point, checked)
    finally:
        link.close()
    return PointReading(point.name, _shown(point, read), point.unit)


def _checked(point: Point, value: str) -> Value:
    """The CLI value checked as an MQTT command would be; a refusal is a usage error (exit 2)."""
    try:
        return parse_command(point, value.encode())
    except CommandRefused as exc:
        raise UsageError(f"refused: {exc.reason}") from None
