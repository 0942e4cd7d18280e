"""The write step: one checked value onto the wire, never retried, then read back.

Shared by MQTT commands (bridge.mqtt.commands) and the `write` CLI; everything before it (payload
parsing, limits, the request) is pure and lives in bridge.core.writes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from bridge.core.codec import Value
from bridge.core.normalize import BadValue, engineering
from bridge.core.planner import ReadRequest
from bridge.core.writes import plan_write, readback_request
from bridge.errors import Blame, BridgeError
from bridge.transports.link import Priority
from bridge.transports.ports import WritePort

if TYPE_CHECKING:
    from bridge.config import Point


async def write_point(
    link: WritePort, unit: int, point: Point, value: Value, readback: ReadRequest | None = None
) -> Value:
    """Write checked `value` to `point` (once, never retried), read it back, return that.

    DeviceError / TransportError from the write propagate as they are; a failure of the
    read-back is raised as ReadBackFailed, so callers know the write itself went through.
    """
    op = plan_write(point, value)
    if isinstance(op.value, bool):
        await link.write_coil(unit, op.address, op.value)
    else:
        await link.write_registers(unit, op.address, op.value)
    request = readback if readback is not None else readback_request(point)
    try:
        words = await link.read(unit, request, priority=Priority.READ_BACK)
        return engineering(point, request.decode(words)[0])
    except (BridgeError, BadValue) as exc:
        raise ReadBackFailed(f"written, but the read-back failed: {exc}") from None


class ReadBackFailed(BridgeError):
    """The write was acknowledged by the device, but reading the point back failed."""

    blame: ClassVar[Blame] = "device"
