"""One-off reads for the CLI: a URL and raw addresses, or a configured device's points."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from pydantic import ValidationError

from bridge.config import Config, Device, LineLink, Point
from bridge.core.codec import (
    BIT_TABLES,
    BYTE_ORDERS,
    POINT_TYPES,
    BlockLayout,
    ByteOrder,
    Field,
    PointType,
    Table,
    Value,
    register_count,
    shortest_float32,
)
from bridge.core.messages import Message
from bridge.core.normalize import engineering
from bridge.core.planner import MAX_READ_BITS, MAX_READ_REGISTERS, plan_device
from bridge.core.writes import CommandRefused, parse_command
from bridge.errors import DeviceError, UsageError
from bridge.instrument import InstrumentPoller
from bridge.transports.line import LinePort
from bridge.transports.link import Link
from bridge.transports.links import build_links, plan_for
from bridge.transports.modbus import LINK_KINDS, SERIAL_KINDS, Endpoint, LinkKind, ModbusClient
from bridge.transports.writestep import write_point

DEFAULT_PORTS = {"tcp": 502, "udp": 502}  # rtu-over-tcp servers use all sorts: ask for it
SERIAL_SETTINGS = ("baudrate", "parity", "stopbits", "bytesize")
URL_FORMS = (
    "tcp://host[:port], udp://host[:port], rtu-over-tcp://host:port, "
    "rtu:///dev/ttyUSB0?baudrate=19200&parity=E&stopbits=1&bytesize=8, "
    "ascii:///dev/ttyS0?baudrate=9600"
)


def parse_url(url: str, *, timeout: float) -> Endpoint:
    """A link URL -> Endpoint; a UsageError naming what is wrong for anything else."""
    parts = urlsplit(url)
    kind = next((k for k in LINK_KINDS if k == parts.scheme), None)
    if kind is None:
        raise UsageError(f"{url!r}: scheme must be one of {', '.join(LINK_KINDS)} "
                         f"({URL_FORMS})")
    try:
        query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise UsageError(f"{url!r}: the query is not key=value&key=value") from None
    if kind in SERIAL_KINDS:
        return _serial_endpoint(url, kind, parts.netloc, parts.path, query, timeout=timeout)
    if query:
        raise UsageError(f"{url!r}: {kind} URLs take no query ({', '.join(sorted(query))})")
    try:
        port = parts.port or DEFAULT_PORTS.get(kind)
    except ValueError:
        raise UsageError(f"{url!r}: the port is not a number from 0 to 65535") from None
    if not parts.hostname or port is None:
        raise UsageError(f"{url!r}: expected {kind}://host:port")
    return Endpoint(kind, parts.hostname, port, timeout)


def _serial_endpoint(
    url: str, kind: LinkKind, netloc: str, path: str, query: dict[str, list[str]], *,
    timeout: float,
) -> Endpoint:
    # `rtu:///dev/ttyUSB0` has an empty netloc; `rtu://COM3` (Windows) keeps it there.
    port = netloc + path if netloc else path
    if not port:
        raise UsageError(f"{url!r}: expected {kind}:///dev/ttyUSB0?baudrate=9600")
    unknown = sorted(set(query) - set(SERIAL_SETTINGS))
    if unknown:
        raise UsageError(f"{url!r}: unknown setting {unknown[0]!r} "
                         f"(known: {', '.join(SERIAL_SETTINGS)})")
    one = {key: values[-1] for key, values in query.items()}
    baudrate = _choice(url, "baudrate", one.get("baudrate", "9600"), None)
    parity = one.get("parity", "N").upper()
    if parity not in ("N", "E", "O"):
        raise UsageError(f"{url!r}: parity={one['parity']!r} must be N, E or O")
    stopbits = _choice(url, "stopbits", one.get("stopbits", "1"), (1, 2))
    bytesize = _choice(url, "bytesize", one.get("bytesize", "8"), (7, 8))
    return Endpoint(kind, port, 0, timeout, baudrate=baudrate,
                    parity="N" if parity == "N" else "E" if parity == "E" else "O",
                    stopbits=stopbits, bytesize=bytesize)


def _choice(url: str, key: str, text: str, allowed: tuple[int, ...] | None) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if (allowed is None and value > 0) or (allowed is not None and value in allowed):
        return value
    want = "a positive whole number" if allowed is None else " or ".join(map(str, allowed))
    raise UsageError(f"{url!r}: {key}={text!r} must be {want}")


async def read_url(
    url: str,
    *,
    unit: int,
    table: Table,
    address: int | None,
    count: int,
    type_: str | None,
    byte_order: str,
    timeout: float,  # noqa: ASYNC109 - the link's per-request timeout, passed to pymodbus
) -> list[tuple[int, Value]]:
    """`count` values of `type_` from `address`, as (address, value) pairs.

    For `string`, `count` is the registers of one string (2 characters each), as a map point's
    `count` is: model names and serial numbers are one value spread over several registers.
    """
    endpoint = parse_url(url, timeout=timeout)
    kind = _point_type(type_, table)
    order = _byte_order(byte_order)
    if not 0 <= unit <= 247:
        raise UsageError(f"--unit {unit}: must be 0-247")
    if count < 1:
        raise UsageError(f"--count {count}: must be 1 or more")
    if table in BIT_TABLES and kind != "bool":
        raise UsageError(f"--type {kind}: {table} tables hold bits; use --type bool")
    fields: list[Field]
    if table in BIT_TABLES:
        total, fields = count, []
    elif kind == "string":
        total, fields = count, [Field(0, "string", order, count=count)]
    else:
        size = register_count(kind)
        total, fields = size * count, [Field(i * size, kind, order) for i in range(count)]
    _check_request_size(table, kind, count, total)
    if address is None:  # checked after the rest, so a wrong URL or type is named first
        raise UsageError("--address is required with a URL (the 0-based PDU address)")
    if not address >= 0 or address + total > 65536:
        raise UsageError(f"--address {address}: the read must stay within 0-65535")
    client = ModbusClient(endpoint, backoff_cap=0)
    try:
        words = await client.read(unit, table, address, total)
    finally:
        client.close()
    if table in BIT_TABLES:
        return [(address + i, bool(w)) for i, w in enumerate(words)]
    values = BlockLayout(total, fields).decode(words)
    return [(address + f.offset, _shortest(f.type, v)) for f, v in zip(fields, values, strict=True)]


# What one request may carry, per table (Modbus Application Protocol v1.1b3, 6.1-6.4).
_TABLE_NAMES: dict[Table, str] = {
    "holding": "holding registers", "input": "input registers",
    "coil": "coils", "discrete": "discrete inputs",
}


def _check_request_size(table: Table, kind: PointType, count: int, total: int) -> None:
    """A read the device would refuse is a usage error naming the limit in the table's unit."""
    bits = table in BIT_TABLES
    limit = MAX_READ_BITS if bits else MAX_READ_REGISTERS
    if total <= limit:
        return
    unit = "bits" if bits else "registers"
    spans = f" ({count} x {kind} = {total} registers)" if total != count else ""
    raise UsageError(f"--count {count}{spans}: one read of {_TABLE_NAMES[table]} is limited "
                     f"to {limit} {unit}")


def _shortest(kind: PointType, value: Value) -> Value:
    """float32 values print as the shortest decimal that is the same float32 (229.87392)."""
    return shortest_float32(value) if kind == "float32" and isinstance(value, float) else value


def _shown(point: Point, value: Value) -> Value:
    """A point's engineering value as the CLI prints it: `precision`, when set, has rounded it
    already; without it a float32 (scaled or not) shows no more digits than a float32 holds."""
    return value if point.precision is not None else _shortest(point.type, value)


def _point_type(type_: str | None, table: Table) -> PointType:
    if type_ is None:
        return "bool" if table in BIT_TABLES else "uint16"
    for known in POINT_TYPES:
        if known == type_:
            return known
    raise UsageError(f"--type {type_!r}: must be one of {', '.join(POINT_TYPES)}")


def _byte_order(order: str) -> ByteOrder:
    for known in BYTE_ORDERS:
        if known == order:
            return known
    raise UsageError(f"--byte-order {order!r}: must be one of {', '.join(BYTE_ORDERS)}")


@dataclass(frozen=True, slots=True)
class PointReading:
    name: str
    value: Value
    unit: str | None


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
    groups = plan_device(points, interval=0, max_registers=max_registers, max_gap=max_gap)
    link = build_links(config.model_copy(update={"devices": [device]}))[device.link]
    values: dict[str, Value] = {}
    try:
        for group in groups:
            for request in group.requests:
                words = await link.read(device.unit, request)
                for point, value in zip(request.points, request.decode(words), strict=True):
                    values[point.name] = _shown(point, engineering(point, value))
    finally:
        link.close()
    return [PointReading(p.name, values[p.name], p.unit) for p in points if p.name in values]


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
    kind = _point_type(type_, table)
    if table in BIT_TABLES and kind != "bool":
        raise UsageError(f"--type {kind}: coils hold bits; use --type bool")
    if kind == "string":
        raise UsageError("--type string: write strings through -c and a configured point")
    if not 0 <= unit <= 247:
        raise UsageError(f"--unit {unit}: must be 0-247")
    try:
        point = Point.model_validate({
            "name": "value", "table": table, "type": kind, "address": address,
            "byte_order": _byte_order(byte_order), "writable": True,
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
