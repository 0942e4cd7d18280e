"""One-off reads for the CLI from a link URL and raw addresses (`read tcp://…`), and the URL
grammar every commissioning command shares. Config-form reads and all writes are in
tools.points: this module stays clear of the config's pydantic models so `read URL` starts fast.
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

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
from bridge.core.planner import MAX_READ_BITS, MAX_READ_REGISTERS
from bridge.errors import UsageError
from bridge.transports.modbus import LINK_KINDS, SERIAL_KINDS, Endpoint, LinkKind, ModbusClient

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
    kind = parse_point_type(type_, table)
    order = parse_byte_order(byte_order)
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
    return [(address + f.offset, shortest(f.type, v)) for f, v in zip(fields, values, strict=True)]


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


def shortest(kind: PointType, value: Value) -> Value:
    """float32 values print as the shortest decimal that is the same float32 (229.87392)."""
    return shortest_float32(value) if kind == "float32" and isinstance(value, float) else value


def parse_point_type(type_: str | None, table: Table) -> PointType:
    """`--type`, defaulting to what `table` holds; a UsageError for an unknown type."""
    if type_ is None:
        return "bool" if table in BIT_TABLES else "uint16"
    for known in POINT_TYPES:
        if known == type_:
            return known
    raise UsageError(f"--type {type_!r}: must be one of {', '.join(POINT_TYPES)}")


def parse_byte_order(order: str) -> ByteOrder:
    """`--byte-order`; a UsageError for an unknown order."""
    for known in BYTE_ORDERS:
        if known == order:
            return known
    raise UsageError(f"--byte-order {order!r}: must be one of {', '.join(BYTE_ORDERS)}")
