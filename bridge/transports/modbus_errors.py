"""pymodbus' failures, turned into the bridge's own at the edge (httpcore's `map_exceptions`).

What the Modbus transport (bridge.transports.modbus) needs to keep pymodbus behind its wall:
the exception names of the spec, the two device errors only a transport can tell apart
(no response, a bad frame), the mapping of pymodbus/pyserial/socket errors, a guard for the
cancels pymodbus' wait_for drops, and why a connect failed (pymodbus logs it and says False).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import socket
from collections.abc import Awaitable, Iterator
from typing import Any, TypeVar

from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException

from bridge.errors import DeviceError, TransportError

T = TypeVar("T")

# Modbus exception codes (Modbus Application Protocol v1.1b3, section 7).
EXCEPTION_NAMES = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "server device failure",
    5: "acknowledge",
    6: "server device busy",
    8: "memory parity error",
    10: "gateway path unavailable",
    11: "gateway target device failed to respond",
}


class NoResponse(TransportError):
    """Nothing came back within the timeout: the unit is dead, or not there.

    The link is up (other units on it may answer), so a poll cycle goes on after it.
    """

    @property
    def link_down(self) -> bool:
        return False

    def failure_kind(self) -> str:
        return "no_response"


class BadFrame(DeviceError):
    """Bytes came back but no valid reply: CRC/LRC error, truncated frame, garbage."""

    def failure_kind(self) -> str:
        return "bad_frame"


@contextlib.contextmanager
def map_exceptions(what: str) -> Iterator[None]:
    """Turn pymodbus, pyserial and socket errors into TransportError / DeviceError at the edge."""
    try:
        yield
    except ModbusIOException as exc:
        raise NoResponse(f"{what}: no valid response ({short_error(exc)})") from None
    except (ConnectionException, OSError) as exc:  # serial.SerialException is an OSError
        raise TransportError(f"{what}: {short_error(exc)}") from None
    except ModbusException as exc:
        raise DeviceError(f"{what}: {short_error(exc)}") from None


async def honouring_cancel(call: Awaitable[T]) -> T:
    """Await a pymodbus call, then raise any cancel it swallowed.

    pymodbus awaits replies and connects with asyncio.wait_for, which on Python 3.11 returns
    the result (or raises the reply's error) and drops a cancel that lands once that result
    is there (CPython gh-86296). A poller being stopped then never sees its cancel and polls
    on for ever: with 200 devices on a busy link, SIGTERM hung. Task.cancelling() still
    counts the unhonoured request, so it is raised here.
    """
    try:
        return await call
    finally:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise asyncio.CancelledError  # the cancel wins over any result or error


def short_error(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.removeprefix("Modbus Error: ").splitlines()[0]


_CONNECT_ERRNOS = {
    errno.ECONNREFUSED: "refused (nothing listening on that port?)",
    errno.ETIMEDOUT: "timed out",
    errno.EHOSTUNREACH: "no route to host",
    errno.ENETUNREACH: "network unreachable",
}


class ConnectAttempt:
    """Why a pymodbus connect failed: pymodbus logs the OSError and returns False, so the
    reason is kept by wrapping the coroutine factory it calls (`ctx.call_create`).

    On a pymodbus without that hook the reason is simply not known: `reason` returns "".
    """

    def __init__(self, client: object) -> None:
        self.error: BaseException | None = None
        ctx: Any = getattr(client, "ctx", None)
        create = getattr(ctx, "call_create", None)
        if create is None:
            return

        async def create_and_keep() -> Any:
            try:
                return await create()
            except BaseException as exc:  # CancelledError too: wait_for's connect timeout
                self.error = exc
                raise

        ctx.call_create = create_and_keep

    def reason(self, timeout: float) -> str:
        exc = self.error
        if exc is None:
            return ""
        if isinstance(exc, asyncio.CancelledError | TimeoutError):
            return f"timed out after {timeout:g}s"
        if isinstance(exc, socket.gaierror):
            return f"unknown host ({exc.strerror})"
        if not isinstance(exc, OSError):
            return short_error(exc)
        code = exc.errno
        if code is None:
            # asyncio tried several addresses (IPv6 and IPv4): one errno for all, if they agree.
            codes = set(re.findall(r"\[Errno (\d+)\]", str(exc)))
            code = int(codes.pop()) if len(codes) == 1 else None
        if code is None:
            return short_error(exc)
        return _CONNECT_ERRNOS.get(code) or os.strerror(code)
