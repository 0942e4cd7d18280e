"""Per-link scheduling: one transaction at a time, writes before polls, silence between frames.

A serial bus carries one transaction at a time, and so does a TCP gateway in front of one.
Every user of a link (pollers, the write path, one-off reads) takes a turn here. Waiting turns
are served by priority, then in arrival order: a write command never waits behind a queue of
polls. After each transaction the link stays quiet for `silence` seconds (the serial-line
spec's inter-frame gap plus any `request_delay`) before the next frame may start.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from enum import IntEnum

from bridge.core.planner import ReadRequest
from bridge.transports.modbus import ModbusClient


class Priority(IntEnum):
    """Lower goes first."""

    WRITE = 0
    READ_BACK = 1
    POLL = 2


class LinkScheduler:
    """A priority lock with a quiet time after each holder."""

    def __init__(self, *, silence: float = 0.0) -> None:
        self.silence = silence
        self._busy = False
        self._waiting: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()
        self._quiet_until = 0.0
        self.transactions = 0

    @asynccontextmanager
    async def turn(self, priority: Priority) -> AsyncIterator[None]:
        await self._acquire(priority)
        try:
            wait = self._quiet_until - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            yield
        finally:
            self.transactions += 1
            self._quiet_until = time.monotonic() + self.silence
            self._release()

    @property
    def waiting(self) -> int:
        return sum(1 for _, _, fut in self._waiting if not fut.done())

    async def _acquire(self, priority: Priority) -> None:
        if not self._busy and not self._waiting:
            self._busy = True
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (int(priority), next(self._order), fut))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._release()  # the turn was handed to us as we were cancelled: pass it on
            raise

    def _release(self) -> None:
        while self._waiting:
            _, _, fut = heapq.heappop(self._waiting)
            if not fut.done():
                fut.set_result(None)  # ownership passes straight to the next waiter
                return
        self._busy = False


class Link:
    """A Modbus client and the scheduler every transaction on it goes through."""

    def __init__(self, client: ModbusClient, *, silence: float = 0.0) -> None:
        self.client = client
        self.scheduler = LinkScheduler(silence=silence)

    @property
    def timeout(self) -> float:
        """Seconds one transaction may take before it is a `NoResponse` (the endpoint's)."""
        return self.client.endpoint.timeout

    async def read(
        self, unit: int, request: ReadRequest, priority: Priority = Priority.POLL
    ) -> list[int]:
        async with self.scheduler.turn(priority):
            return await self.client.read(unit, request.table, request.address, request.count)

    async def write_registers(self, unit: int, address: int, values: Sequence[int]) -> None:
        async with self.scheduler.turn(Priority.WRITE):
            await self.client.write_registers(unit, address, values)

    async def write_coil(self, unit: int, address: int, value: bool) -> None:
        async with self.scheduler.turn(Priority.WRITE):
            await self.client.write_coil(unit, address, value)

    def close(self) -> None:
        self.client.close()
