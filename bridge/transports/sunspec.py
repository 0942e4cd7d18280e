"""Walking a device's SunSpec model chain over a link: bridge.core.sunspec.ChainWalk says what
to read, this module reads it. `m2m-bridge sunspec` and the daemon's start-up of a
`map: sunspec` device both walk with it.
"""

from __future__ import annotations

from collections.abc import Sequence

from bridge.core.planner import ReadRequest
from bridge.core.sunspec import BASES, Chain, ChainWalk, NotSunSpec, SunSpecError
from bridge.errors import DeviceError
from bridge.transports.link import Link, Priority
from bridge.transports.modbus_errors import EXCEPTION_NAMES

GATEWAY_NO_TARGET = (10, 11)  # a TCP gateway saying the unit behind it is silent: no device


async def read_chain(
    link: Link,
    unit: int,
    *,
    bases: Sequence[int] = BASES,
    max_registers: int = 125,
    priority: Priority = Priority.POLL,
) -> Chain:
    """The chain of `unit`, from the first of `bases` that holds the "SunS" marker.

    A base that is refused (a Modbus exception) or holds something else is passed over; if
    none holds the marker, NotSunSpec names what each held. Silence (NoResponse) and a failed
    link are raised as they come: the other bases would only say the same. A read refused
    once the chain is being walked is a broken chain (SunSpecError).
    """
    found: list[str] = []
    for base in bases:
        walk = ChainWalk(base, max_registers=max_registers)
        try:
            walk.feed(await _read(link, unit, base, 2, priority))
        except NotSunSpec as exc:
            found.append(str(exc).removeprefix("no SunSpec marker at "))
            continue
        except DeviceError as exc:
            if exc.code is None or exc.code in GATEWAY_NO_TARGET:
                raise
            found.append(f"{base} (exception {exc.code:02d}, "
                         f"{EXCEPTION_NAMES.get(exc.code, 'unknown')})")
            continue
        while (want := walk.wants()) is not None:
            address, count = want
            try:
                words = await _read(link, unit, address, count, priority)
            except DeviceError as exc:
                raise SunSpecError(f"unit {unit}: SunSpec chain broken at {address}: "
                                   f"{_why(exc)}") from None
            try:
                walk.feed(words)
            except SunSpecError as exc:
                raise SunSpecError(f"unit {unit}: {exc}") from None
        return walk.chain()
    raise NotSunSpec(f"unit {unit}: not a SunSpec device: no 'SunS' marker at "
                     f"{'; '.join(found)}")


async def _read(link: Link, unit: int, address: int, count: int, priority: Priority) -> list[int]:
    request = ReadRequest(table="holding", address=address, count=count, points=(), layout=None)
    return await link.read(unit, request, priority)


def _why(exc: DeviceError) -> str:
    text = str(exc)
    at = text.find("Modbus exception")
    return text[at:] if at >= 0 else text
