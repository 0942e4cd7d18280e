"""`m2m-bridge probe`: what type and byte order some registers hold, as data, not folklore.

The registers are read twice, `GAP` seconds apart (a value that moves shows which word is the
low one), and every reading bridge.core.plausibility can make of them is ranked there.
"""

from __future__ import annotations

import asyncio

from bridge.core.codec import Table
from bridge.core.planner import MAX_READ_REGISTERS, ReadRequest
from bridge.core.plausibility import TYPES_BY_SIZE, Candidate, candidates
from bridge.errors import UsageError
from bridge.tools.oneshot import parse_url
from bridge.tools.scan import MAX_UNIT
from bridge.transports.link import Link
from bridge.transports.modbus import ModbusClient

GAP = 0.5  # seconds between the two reads
REGISTER_TABLES: dict[str, Table] = {"holding": "holding", "input": "input"}


async def probe(
    url: str,
    *,
    unit: int,
    table: str,
    address: int,
    count: int,
    expect: tuple[float, float] | None,
    timeout: float,  # noqa: ASYNC109 - the link's per-request timeout, passed to pymodbus
    gap: float = GAP,
) -> list[Candidate]:
    """Read `count` registers twice and rank what they could be, best first."""
    endpoint = parse_url(url, timeout=timeout)
    if not 1 <= unit <= MAX_UNIT:
        raise UsageError(f"--unit {unit}: must be 1-{MAX_UNIT}")
    kind = REGISTER_TABLES.get(table)
    if kind is None:
        raise UsageError(f"--table {table!r}: probe reads registers: holding or input")
    if not 1 <= count <= MAX_READ_REGISTERS:
        raise UsageError(f"--count {count}: registers, 1-{MAX_READ_REGISTERS}")
    if not 0 <= address <= 65536 - count:
        raise UsageError(f"--address {address}: the read must stay within 0-65535")
    request = ReadRequest(table=kind, address=address, count=count, points=(), layout=None)
    link = Link(ModbusClient(endpoint, backoff_cap=0))
    try:
        first = await link.read(unit, request)
        await asyncio.sleep(gap)
        second = await link.read(unit, request)
    finally:
        link.close()
    return candidates(first, second, expect)


def sizes_note(count: int) -> str:
    """Why a count gave only strings: the numeric types come in 1, 2 and 4 registers."""
    if count in TYPES_BY_SIZE:
        return ""
    return f"(no numeric type spans {count} registers: 1, 2 or 4 do)"
