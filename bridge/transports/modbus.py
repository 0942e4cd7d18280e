"""Modbus client transport: one pymodbus async client per link, pymodbus kept behind this wall.

Everything pymodbus raises or returns as an error is mapped here to bridge.errors, so the
poller, the CLI and the write path never see a pymodbus type (httpcore's `map_exceptions`).

The link owns the connection; the units behind it (a TCP-to-RS485 gateway or an RS-485 line
often carries many) share it. pymodbus' own reconnect loop and its "close after N timeouts"
rule are switched off: a dead slave must not tear down the connection its live neighbours use,
and reconnects follow our jittered back-off instead of pymodbus' fixed one. The same back-off
reopens a serial port whose tty vanished (a USB converter unplugged) once it is back.

Link kinds: `tcp` and `udp` (MBAP framing, transaction ids), `rtu-over-tcp` (RTU frames over a
TCP socket, for transparent serial servers), `rtu` and `ascii` (a serial port via pyserial).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient, AsyncModbusUdpClient
from pymodbus.exceptions import ModbusIOException
from pymodbus.framer import FramerType

from bridge.core import bustime
from bridge.core.backoff import backoff
from bridge.core.codec import BIT_TABLES, Table
from bridge.errors import DeviceError, TransportError
from bridge.transports.modbus_errors import (
    EXCEPTION_NAMES,
    BadFrame,
    ConnectAttempt,
    NoResponse,
    honouring_cancel,
    map_exceptions,
    short_error,
)

_NEVER_DISCONNECT = 1 << 30

LinkKind = Literal["tcp", "udp", "rtu-over-tcp", "rtu", "ascii"]
LINK_KINDS: tuple[LinkKind, ...] = ("tcp", "udp", "rtu-over-tcp", "rtu", "ascii")
SERIAL_KINDS = frozenset({"rtu", "ascii"})
# Frames without a transaction id: a late reply cannot be told apart from the next one's.
UNTAGGED_KINDS = frozenset({"rtu", "ascii", "rtu-over-tcp"})
# After a timeout on an untagged link, the line must stay quiet this long (at least) before the
# next request goes out, so a slave answering late is not heard as the answer to the next one.
# It is bounded by the link's timeout: a dead unit then costs the bus at most two timeouts per
# back-off step, and usually its timeout plus 50 ms.
SETTLE_MIN = 0.05
SETTLE_CHARS = 40  # ... or this many character times on a slow line, whichever is longer

READ_FUNCTION_CODES: dict[Table, int] = {"coil": 1, "discrete": 2, "holding": 3, "input": 4}

logging.getLogger("pymodbus").setLevel(logging.CRITICAL)  # we log state changes ourselves


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a Modbus link connects: a host and port, or a serial port and its settings."""

    kind: LinkKind
    host: str  # the serial device path for `rtu` / `ascii`
    port: int  # 0 for serial links
    timeout: float
    baudrate: int = 9600
    parity: Literal["N", "E", "O"] = "N"
    stopbits: int = 1
    bytesize: int = 8

    @property
    def is_serial(self) -> bool:
        return self.kind in SERIAL_KINDS

    def __str__(self) -> str:
        if self.is_serial:
            return f"{self.kind}://{self.host}"
        return f"{self.kind}://{self.host}:{self.port}"


@dataclass(slots=True)
class LinkCounters:
    """What went wrong on the wire, for the logs, the metrics and the tests."""

    requests: int = 0
    timeouts: int = 0  # silence: nothing at all came back
    bad_frames: int = 0  # bytes came back, but no valid reply (CRC, short, garbage, late)
    settles: int = 0  # waits for the line to go quiet after a timeout
    connects: int = 0
    connect_failures: int = 0
    disconnects: int = 0
    exceptions: dict[int, int] = field(default_factory=dict)


def char_time(endpoint: Endpoint) -> float:
    """Seconds one character takes on the line (ASCII is no faster); 0 off serial lines."""
    return bustime.char_time(endpoint.baudrate) if endpoint.is_serial else 0.0


AnyClient = AsyncModbusTcpClient | AsyncModbusUdpClient | AsyncModbusSerialClient

class ModbusClient:
    """One connection to a Modbus endpoint, shared by every unit behind it.

    Connection attempts back off (bridge.core.backoff: 1 s doubling, jittered, capped) so a
    rebooting gateway is not hammered by every device at once; requests made during a
    back-off fail fast with TransportError.

    Callers serialise transactions (bridge.transports.link.Link); this class assumes one at a time.
    """

    def __init__(self, endpoint: Endpoint, *, backoff_cap: float = 60.0) -> None:
        self.endpoint = endpoint
        self.counters = LinkCounters()
        self._backoff_cap = backoff_cap
        self._client: AnyClient | None = None
        self._failures = 0
        self._retry_at = 0.0
        self._connect_lock = asyncio.Lock()
        # Receive-side bookkeeping, fed by pymodbus' trace_packet hook (its public way to see
        # the raw byte stream): whether anything arrived during the current transaction, and
        # when the line last carried a byte.
        self._rx_seen = False
        self._last_rx = 0.0
        self._dirty = False  # a timeout happened: a late reply may still be on its way
        self._settle = min(endpoint.timeout, max(SETTLE_MIN, SETTLE_CHARS * char_time(endpoint)))

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.connected

    def _trace_packet(self, sending: bool, data: bytes) -> bytes:
        if not sending:
            self._rx_seen = True
            self._last_rx = time.monotonic()
        return data

    def _trace_connect(self, connected: bool) -> None:
        if not connected:
            self.counters.disconnects += 1

    def _new_client(self) -> AnyClient:
        ep = self.endpoint
        common: dict[str, Any] = {
            "timeout": ep.timeout,
            "retries": 0,  # writes are never retried blindly; polls retry on their schedule
            "reconnect_delay": 0,  # 0 disables pymodbus' own reconnect loop
            "trace_packet": self._trace_packet,
            "trace_connect": self._trace_connect,
        }
        client: AnyClient
        if ep.kind in SERIAL_KINDS:
            client = AsyncModbusSerialClient(
                ep.host,
                framer=FramerType.RTU if ep.kind == "rtu" else FramerType.ASCII,
                baudrate=ep.baudrate,
                parity=ep.parity,
                stopbits=ep.stopbits,
                bytesize=ep.bytesize,
                **common,
            )
        elif ep.kind == "udp":
            client = AsyncModbusUdpClient(ep.host, port=ep.port, **common)
        else:
            framer = FramerType.RTU if ep.kind == "rtu-over-tcp" else FramerType.SOCKET
            client = AsyncModbusTcpClient(ep.host, port=ep.port, framer=framer, **common)
        client.set_max_no_responses(_NEVER_DISCONNECT)
        self._guard_receive(client)
        return client

    def _guard_receive(self, client: AnyClient) -> None:
        """Make a frame pymodbus cannot decode a bad frame, not a crash of its protocol.

        pymodbus raises out of data_received on some malformed replies (a byte count that
        does not match its data, a header announcing no PDU). asyncio then logs "Fatal error:
        protocol.data_received() call failed" with a traceback, once per frame, and drops
        the connection, which the poller counts as a link failure. Here the bytes are
        flushed and the waiting request fails at once; `_call` counts it as a bad frame and
        the connection stays up (DESIGN.md: garbage frames are flushed, counted, and polling
        goes on). Without the hooks (another pymodbus) nothing is wrapped.
        """
        ctx: Any = getattr(client, "ctx", None)
        for name in ("data_received", "datagram_received"):
            receive = getattr(ctx, name, None)
            if callable(receive):
                setattr(ctx, name, self._guarded(ctx, receive))

    def _guarded(self, ctx: Any, receive: Callable[..., None]) -> Callable[..., None]:
        def guarded(*args: Any) -> None:
            try:
                receive(*args)
            except Exception as exc:  # undecodable bytes: the reply's fault, not ours
                self._rx_seen = True
                ctx.recv_buffer = b""
                waiting = getattr(ctx, "response_future", None)
                if isinstance(waiting, asyncio.Future) and not waiting.done():
                    why = f"undecodable reply: {short_error(exc)}"
                    waiting.set_exception(ModbusIOException(why))

        return guarded

    async def _ensure(self) -> AnyClient:
        async with self._connect_lock:
            if self._client is not None and self._client.connected:
                return self._client
            wait = self._retry_at - time.monotonic()
            if wait > 0:
                raise TransportError(f"{self.endpoint}: not connected, next attempt in {wait:.1f}s")
            if self._client is not None:
                self._client.close()
                self._client = None
            reason = "connection failed"
            ok = False
            # One stat of a device node: not worth a thread.
            if self.endpoint.is_serial and not os.path.exists(self.endpoint.host):  # noqa: ASYNC240
                reason = "no such serial port (unplugged?)"  # pyserial would only say errno 2
            else:
                client = self._new_client()
                attempt = ConnectAttempt(client)
                try:
                    with map_exceptions(str(self.endpoint)):
                        ok = await honouring_cancel(client.connect())
                except asyncio.CancelledError:
                    client.close()  # connected or not, nobody will use it
                    raise
                if ok:
                    self._client = client
                else:
                    client.close()
                    why = attempt.reason(self.endpoint.timeout)
                    what = "cannot open the serial port" if self.endpoint.is_serial else reason
                    reason = f"{what}: {why}" if why else what
            if not ok or self._client is None:
                self.counters.connect_failures += 1
                self._failures += 1
                delay = backoff(self._failures, first=1.0, cap=self._backoff_cap)
                self._retry_at = time.monotonic() + delay
                raise TransportError(f"{self.endpoint}: {reason}")
            self.counters.connects += 1
            self._failures = 0
            self._dirty = False
            return self._client

    async def _quiet_line(self) -> None:
        """After a timeout on an untagged link, wait until the line has been quiet a while.

        pymodbus drops its receive buffer when it sends, and ignores a frame that arrives with
        no request outstanding; what it cannot tell is a late reply that arrives just after the
        next request went out. So the next transaction waits until nothing has arrived for
        `_settle` seconds (bounded by one timeout: a babbling line cannot stall the bus forever).
        """
        if not self._dirty:
            return
        self._dirty = False
        if self.endpoint.kind not in UNTAGGED_KINDS:
            return
        self.counters.settles += 1
        deadline = time.monotonic() + self.endpoint.timeout
        while True:
            now = time.monotonic()
            quiet_for = now - self._last_rx
            if quiet_for >= self._settle or now >= deadline:
                return
            await asyncio.sleep(min(self._settle - quiet_for, deadline - now))

    async def _call(self, what: str, unit: int, op: Any) -> Any:
        """Run one pymodbus request `op(client)`, classifying what the line did."""
        client = await self._ensure()
        await self._quiet_line()
        self._rx_seen = False
        self.counters.requests += 1
        label = f"{self.endpoint} unit {unit}"
        try:
            with map_exceptions(label):
                reply = await honouring_cancel(op(client))
        except NoResponse:
            self._dirty = True
            self._last_rx = time.monotonic()  # the settle wait counts from the timeout
            if not client.connected:
                if self._rx_seen:  # part of a reply, then a close: a truncated frame
                    self.counters.bad_frames += 1
                    raise BadFrame(
                        f"{label}: {what}: reply cut short (connection closed mid-frame)",
                    ) from None
                # The port vanished or the peer closed while we waited: a link failure.
                raise TransportError(f"{label}: connection lost") from None
            if self._rx_seen:
                self.counters.bad_frames += 1
                raise BadFrame(
                    f"{label}: {what}: no valid reply (bad CRC, truncated or garbled frame)",
                ) from None
            self.counters.timeouts += 1
            raise NoResponse(
                f"{label}: {what}: no response within {self.endpoint.timeout:g}s",
            ) from None
        if reply.isError():
            code = int(getattr(reply, "exception_code", 0))
            self.counters.exceptions[code] = self.counters.exceptions.get(code, 0) + 1
            name = EXCEPTION_NAMES.get(code, "unknown exception")
            raise DeviceError(
                f"unit {unit}: {what}: Modbus exception {code:02d} ({name})",
                code=code,
            )
        return reply

    async def read(self, unit: int, table: Table, address: int, count: int) -> list[int]:
        """`count` registers (or bits, as 0/1) of `table` from `address` on `unit`."""
        what = f"read {table} {address}+{count}"

        async def op(client: AnyClient) -> Any:
            if table == "holding":
                return await client.read_holding_registers(address, count=count, device_id=unit)
            if table == "input":
                return await client.read_input_registers(address, count=count, device_id=unit)
            if table == "coil":
                return await client.read_coils(address, count=count, device_id=unit)
            return await client.read_discrete_inputs(address, count=count, device_id=unit)

        reply = await self._call(what, unit, op)
        expected = READ_FUNCTION_CODES[table]
        if getattr(reply, "function_code", expected) != expected:
            # pymodbus pairs replies with requests by transaction id only: a reply for another
            # function (a confused gateway, a late answer on a shared line) is not our data.
            self.counters.bad_frames += 1
            raise BadFrame(
                f"unit {unit}: reply with function code {reply.function_code}, "
                f"expected {expected}"
            )
        if table in BIT_TABLES:
            bits = list(reply.bits)
            if len(bits) < count:
                self.counters.bad_frames += 1
                raise BadFrame(f"unit {unit}: short reply, {len(bits)} of {count} bits")
            return [int(b) for b in bits[:count]]
        registers = list(reply.registers)
        if len(registers) != count:
            # On an untagged link this is most likely a late reply to an earlier request.
            self.counters.bad_frames += 1
            raise BadFrame(
                f"unit {unit}: wrong reply size, {len(registers)} of {count} registers"
            )
        return registers

    async def write_registers(self, unit: int, address: int, values: Sequence[int]) -> None:
        """FC6 for one register, FC16 for more: multi-register values go in one request."""
        regs = list(values)

        async def op(client: AnyClient) -> Any:
            if len(regs) == 1:
                return await client.write_register(address, regs[0], device_id=unit)
            return await client.write_registers(address, regs, device_id=unit)

        await self._call(f"write holding {address}+{len(regs)}", unit, op)

    async def write_coil(self, unit: int, address: int, value: bool) -> None:
        """FC5."""

        async def op(client: AnyClient) -> Any:
            return await client.write_coil(address, value, device_id=unit)

        await self._call(f"write coil {address}", unit, op)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
