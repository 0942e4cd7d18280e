"""Modbus client transport: one pymodbus async client per link, pymodbus kept behind this wall.

Everything pymodbus raises or returns as an error is mapped here to bridge.errors, so the
poller, the CLI and the write path never see a pymodbus type (httpcore's `map_exceptions`).

The link owns the connection; the units behind it (a TCP-to-RS485 gateway often fronts many)
share it. pymodbus' own reconnect loop and its "close after N timeouts" rule are switched off:
a dead slave behind a gateway must not tear down the connection its live neighbours use, and
reconnects follow our jittered back-off instead of pymodbus' fixed one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException

from bridge.codec import BIT_TABLES, Table
from bridge.errors import DeviceError, TransportError

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
RETRYABLE_CODES = frozenset({5, 6, 10, 11})  # busy or a gateway's own trouble: ask again later
_NEVER_DISCONNECT = 1 << 30

logging.getLogger("pymodbus").setLevel(logging.CRITICAL)  # we log state changes ourselves


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a Modbus link connects: `tcp` now; the serial kinds arrive with the RTU issue."""

    kind: str
    host: str
    port: int
    timeout: float

    def __str__(self) -> str:
        return f"{self.kind}://{self.host}:{self.port}"


@contextlib.contextmanager
def map_exceptions(what: str) -> Iterator[None]:
    """Turn pymodbus and socket errors into TransportError / DeviceError at the edge."""
    try:
        yield
    except ModbusIOException as exc:
        raise DeviceError(f"{what}: no valid response ({_short(exc)})", retryable=True) from None
    except (ConnectionException, OSError) as exc:
        raise TransportError(f"{what}: {_short(exc)}") from None
    except ModbusException as exc:
        raise DeviceError(f"{what}: {_short(exc)}", retryable=True) from None


def _short(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.removeprefix("Modbus Error: ").splitlines()[0]


class ModbusClient:
    """One connection to a Modbus endpoint, shared by every unit behind it.

    Connection attempts back off exponentially with full jitter (aiomqtt's rule:
    `uniform(0, base * 2**attempt)`, capped) so a rebooting gateway is not hammered by every
    device at once; requests made during a back-off fail fast with TransportError.
    """

    def __init__(self, endpoint: Endpoint, *, backoff_cap: float = 60.0) -> None:
        self.endpoint = endpoint
        self._backoff_cap = backoff_cap
        self._client: AsyncModbusTcpClient | None = None
        self._failures = 0
        self._retry_at = 0.0
        self._connect_lock = asyncio.Lock()

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.connected

    async def _ensure(self) -> AsyncModbusTcpClient:
        async with self._connect_lock:
            if self._client is not None and self._client.connected:
                return self._client
            wait = self._retry_at - time.monotonic()
            if wait > 0:
                raise TransportError(f"{self.endpoint}: not connected, next attempt in {wait:.1f}s")
            if self._client is not None:
                self._client.close()
            client = AsyncModbusTcpClient(
                self.endpoint.host,
                port=self.endpoint.port,
                timeout=self.endpoint.timeout,
                retries=0,  # writes are never retried blindly; polls retry on their schedule
                reconnect_delay=0,  # 0 disables pymodbus' own reconnect loop
            )
            client.set_max_no_responses(_NEVER_DISCONNECT)
            with map_exceptions(str(self.endpoint)):
                ok = await client.connect()
            if not ok:
                client.close()
                self._failures += 1
                delay = random.uniform(0, min(self._backoff_cap, 0.5 * 2**self._failures))
                self._retry_at = time.monotonic() + delay
                raise TransportError(f"{self.endpoint}: connection failed")
            self._failures = 0
            self._client = client
            return client

    async def read(self, unit: int, table: Table, address: int, count: int) -> list[int]:
        """`count` registers (or bits, as 0/1) of `table` from `address` on `unit`."""
        client = await self._ensure()
        with map_exceptions(f"{self.endpoint} unit {unit}"):
            if table == "holding":
                reply = await client.read_holding_registers(address, count=count, device_id=unit)
            elif table == "input":
                reply = await client.read_input_registers(address, count=count, device_id=unit)
            elif table == "coil":
                reply = await client.read_coils(address, count=count, device_id=unit)
            else:
                reply = await client.read_discrete_inputs(address, count=count, device_id=unit)
        _raise_for_exception(reply, unit, f"read {table} {address}+{count}")
        if table in BIT_TABLES:
            bits = list(reply.bits)
            if len(bits) < count:
                raise DeviceError(f"unit {unit}: short reply, {len(bits)} of {count} bits")
            return [int(b) for b in bits[:count]]
        registers = list(reply.registers)
        if len(registers) != count:
            raise DeviceError(
                f"unit {unit}: wrong reply size, {len(registers)} of {count} registers"
            )
        return registers

    async def write_registers(self, unit: int, address: int, values: Sequence[int]) -> None:
        """FC6 for one register, FC16 for more: multi-register values go in one request."""
        client = await self._ensure()
        with map_exceptions(f"{self.endpoint} unit {unit}"):
            if len(values) == 1:
                reply = await client.write_register(address, values[0], device_id=unit)
            else:
                reply = await client.write_registers(address, list(values), device_id=unit)
        _raise_for_exception(reply, unit, f"write holding {address}+{len(values)}")

    async def write_coil(self, unit: int, address: int, value: bool) -> None:
        """FC5."""
        client = await self._ensure()
        with map_exceptions(f"{self.endpoint} unit {unit}"):
            reply = await client.write_coil(address, value, device_id=unit)
        _raise_for_exception(reply, unit, f"write coil {address}")

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def _raise_for_exception(reply: Any, unit: int, what: str) -> None:
    if reply.isError():
        code = int(getattr(reply, "exception_code", 0))
        name = EXCEPTION_NAMES.get(code, "unknown exception")
        raise DeviceError(
            f"unit {unit}: {what}: Modbus exception {code:02d} ({name})",
            code=code,
            retryable=code in RETRYABLE_CODES,
        )
