"""Ports: what the device loops and the write step use of their link, and nothing more.

- `PollPort`: what a Modbus poller (bridge.poller.DevicePoller) reads blocks through.
- `WritePort`: what the write step (bridge.transports.writestep.write_point) writes and reads
  back through; commands (bridge.mqtt.commands.CommandHandler) look one up per command.
- `InstrumentPort`: what a line instrument's poller (bridge.instrument.InstrumentPoller) sends
  requests through and receives lines from.

The running service hands them the real thing, `Link` (transports.link: a pymodbus client
behind the link scheduler) and `LinePort` (transports.line: a serial port), which satisfy
these Protocols structurally: mypy checks it where bridge.service builds the loops. The tests
hand them in-memory fakes (tests/fakes.py), so refusal learning, back-off, offline counting,
on-change and the write read-back are unit-tested without sockets, ptys or processes, the way
httpcore tests its connections over a MockStream.

Why here and not in bridge/core: the ports speak transport terms. `WritePort.read` takes the
link scheduler's `Priority`, and `InstrumentPort.attached` takes a `LineReader`, the asyncio
queue a port feeds; the pure core may import neither (it sits under the transports in the
layers, and does no asyncio). Describing the reader by a Protocol of its own in the core would
not do either: `LinePort.attached` accepts only a `LineReader`, and parameters are
contravariant, so `LinePort` would not satisfy such a port. Their users (pollers, commands)
sit above the transports, and write_point beside them, so every user may import this module.

Typing only: nothing here runs, and the imports are for the annotations.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from bridge.config import LineLink
    from bridge.core.planner import ReadRequest
    from bridge.transports.line import LineReader
    from bridge.transports.link import Priority


class PollPort(Protocol):
    """A Modbus link as a poller uses it: reads of blocks, and how long one may take."""

    @property
    def timeout(self) -> float:
        """Seconds one transaction may take before it is a `NoResponse`."""
        ...

    async def read(self, unit: int, request: ReadRequest) -> list[int]:
        """The words (or bits as 0/1) `request` asks `unit` for.

        Raises DeviceError (a Modbus exception: `refused`, `busy`; or a bad frame),
        NoResponse (the unit is silent, the link is up) or TransportError (the link is down).
        """
        ...


class WritePort(Protocol):
    """A Modbus link as the write step uses it: one write, then a read-back."""

    async def read(self, unit: int, request: ReadRequest, *, priority: Priority) -> list[int]:
        """As `PollPort.read`, taking its turn on the link at `priority`."""
        ...

    async def write_registers(self, unit: int, address: int, values: Sequence[int]) -> None:
        """FC6 for one register, FC16 for more (holding registers)."""
        ...

    async def write_coil(self, unit: int, address: int, value: bool) -> None:
        """FC5."""
        ...


class InstrumentPort(Protocol):
    """An ASCII line port as a line instrument uses it."""

    @property
    def link(self) -> LineLink:
        """The configured link (its `timeout` bounds the wait for an answer)."""
        ...

    @property
    def connected(self) -> bool:
        """Whether the port is open now (a silence on a closed port is the link's fault)."""
        ...

    def attached(self, reader: LineReader) -> AbstractAsyncContextManager[None]:
        """Feed `reader` every chunk received while inside."""
        ...

    def transaction(self) -> AbstractAsyncContextManager[None]:
        """One request and its answer at a time on the port."""
        ...

    async def write(self, data: bytes) -> None:
        """Send `data`; TransportError if the port is not open."""
        ...
