"""One-off reads for the CLI: a URL and raw addresses, or a configured device's points."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from bridge.codec import (
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
)
from bridge.config import Config
from bridge.errors import UsageError
from bridge.normalize import engineering
from bridge.planner import MAX_READ_BITS, MAX_READ_REGISTERS, plan_device
from bridge.service import build_links, plan_for
from bridge.transports.modbus import Endpoint, ModbusClient

DEFAULT_PORTS = {"tcp": 502, "udp": 502}
SUPPORTED_SCHEMES = frozenset({"tcp"})
KNOWN_SCHEMES = frozenset({"tcp", "udp", "rtu-over-tcp", "rtu", "ascii"})


def parse_url(url: str, *, timeout: float) -> Endpoint:
    """`tcp://host[:port]` -> Endpoint; a clear UsageError for anything else."""
    parts = urlsplit(url)
    if parts.scheme not in KNOWN_SCHEMES:
        raise UsageError(f"{url!r}: scheme must be one of {', '.join(sorted(KNOWN_SCHEMES))}")
    if parts.scheme not in SUPPORTED_SCHEMES:
        raise UsageError(f"{url!r}: {parts.scheme} links are not supported by this build yet")
    try:
        port = parts.port or DEFAULT_PORTS.get(parts.scheme)
    except ValueError:
        raise UsageError(f"{url!r}: the port is not a number from 0 to 65535") from None
    if not parts.hostname or port is None:
        raise UsageError(f"{url!r}: expected {parts.scheme}://host:port")
    return Endpoint(parts.scheme, parts.hostname, port, timeout)


async def read_url(
    url: str,
    *,
    unit: int,
    table: Table,
    address: int,
    count: int,
    type_: str | None,
    byte_order: str,
    timeout: float,  # noqa: ASYNC109 - the link's per-request timeout, passed to pymodbus
) -> list[tuple[int, Value]]:
    """`count` values of `type_` from `address`, as (address, value) pairs."""
    endpoint = parse_url(url, timeout=timeout)
    kind = _point_type(type_, table)
    order = _byte_order(byte_order)
    if not 0 <= unit <= 247:
        raise UsageError(f"--unit {unit}: must be 0-247")
    if count < 1:
        raise UsageError(f"--count {count}: must be 1 or more")
    if table in BIT_TABLES and kind != "bool":
        raise UsageError(f"--type {kind}: {table} tables hold bits; use --type bool")
    if kind == "string":
        raise UsageError("--type string: read the registers as uint16, or use -c with a point")
    size = 1 if table in BIT_TABLES else register_count(kind)
    total = size * count
    limit = MAX_READ_BITS if table in BIT_TABLES else MAX_READ_REGISTERS
    if total > limit:
        raise UsageError(f"--count {count}: {total} {'bits' if size == 1 else 'registers'} "
                         f"is more than one request may read ({limit})")
    if not address >= 0 or address + total > 65536:
        raise UsageError(f"--address {address}: the read must stay within 0-65535")
    client = ModbusClient(endpoint, backoff_cap=0)
    try:
        words = await client.read(unit, table, address, total)
    finally:
        client.close()
    if table in BIT_TABLES:
        return [(address + i, bool(w)) for i, w in enumerate(words)]
    fields = [Field(i * size, kind, order) for i in range(count)]
    values = BlockLayout(total, fields).decode(words)
    return [(address + i * size, v) for i, v in enumerate(values)]


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
    max_registers, max_gap = plan_for(config, device)
    groups = plan_device(points, interval=0, max_registers=max_registers, max_gap=max_gap)
    link = build_links(config.model_copy(update={"devices": [device]}))[device.link]
    values: dict[str, Value] = {}
    try:
        for group in groups:
            for request in group.requests:
                words = await link.read(device.unit, request)
                for point, value in zip(request.points, request.decode(words), strict=True):
                    values[point.name] = engineering(point, value)
    finally:
        link.close()
    return [PointReading(p.name, values[p.name], p.unit) for p in points if p.name in values]
