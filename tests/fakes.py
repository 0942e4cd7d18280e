"""In-memory ports for unit tests: a Modbus link (`FakeLink`), a line port (`FakeLinePort`),
and the poll schedule's clock (`FakeGrid`).

They implement bridge.transports.ports (PollPort, WritePort, InstrumentPort) without a socket,
pty, process or sleep, so the rules of the device loops and of writes are tested fast and
deterministically, as httpcore tests its connections over a MockStream. The integration tests
(test_recovery, test_instrument, test_commands, test_write_e2e) prove the same rules against
real slaves, ptys and the daemon; these prove them in milliseconds.

FakeLink is a map of units, each with its four tables of registers (unset ones read 0), that
logs every request it is asked (`calls`, also when it fails) and fails on cue, the way
bridge.transports.modbus fails:

- `refuse(unit, table, addresses)`: exception 02 for any request touching one of them;
  `refuse_across(unit, table, address)`: exception 02 for a read that spans `address` (a
  device that cannot read across a page boundary);
- `busy` (a set of units): exception 06 to every request;
- `silent` (a set of units): NoResponse (the link is up, the unit says nothing);
- `down`: TransportError to every request (the link itself is gone);
- `then(unit, *faults)`: the next requests to `unit`, one fault each ("ok" for none), before
  any of the above;
- `pin(unit, table, address, *words)`: registers that acknowledge writes and keep their value
  (a device that clamps, or a point overridden locally).

FakeGrid stands in for the clock, the sleep and the jitter of bridge.device.poll_on_grid, so a
device loop's `run()` shows the waits between its polls (back-off included) without waiting.
VirtualClock does the same for several loops at once, and VirtualBus is a link on it whose reads
take line time, one at a time through the real LinkScheduler: a bus's schedule, exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Literal

import pytest

import bridge.core.backoff
import bridge.device
from bridge.config import LineLink
from bridge.core.codec import Table
from bridge.core.planner import ReadRequest
from bridge.errors import DeviceError, TransportError
from bridge.transports.line import LineReader
from bridge.transports.link import LinkScheduler, Priority
from bridge.transports.modbus_errors import EXCEPTION_NAMES, NoResponse

Fault = Literal["ok", "refuse", "busy", "silent", "down"]


@dataclass(frozen=True, slots=True)
class Call:
    """One request as the device saw it: a read of `count` from `address`, or a write of
    `values` there (a coil write is one value, 0 or 1)."""

    op: Literal["read", "write"]
    unit: int
    table: Table
    address: int
    count: int
    values: tuple[int, ...] = ()
    priority: Priority | None = None  # reads only: the turn they asked for


class FakeLink:
    """A Modbus link to in-memory units: PollPort and WritePort, scripted faults, a log."""

    def __init__(self, *, timeout: float = 0.5) -> None:
        self.timeout = timeout  # only reported (the poller's watchdog bound): nothing waits
        self.calls: list[Call] = []
        self.down = False
        self.busy: set[int] = set()
        self.silent: set[int] = set()
        self.refused: list[tuple[int, Table, range]] = []
        self.refused_across: list[tuple[int, Table, int]] = []
        self._units: dict[int, dict[Table, dict[int, int]]] = {}
        self._pinned: set[tuple[int, Table, int]] = set()
        self._script: dict[int, deque[Fault]] = {}

    # --- the device's map ---------------------------------------------------------------------

    def set(self, unit: int, table: Table, address: int, *words: int) -> None:
        """Registers (or bits, 0/1) from `address` on `unit`."""
        cells = self._units.setdefault(unit, {}).setdefault(table, {})
        for offset, word in enumerate(words):
            cells[address + offset] = word

    def get(self, unit: int, table: Table, address: int, count: int = 1) -> list[int]:
        cells = self._units.get(unit, {}).get(table, {})
        return [cells.get(a, 0) for a in range(address, address + count)]

    def pin(self, unit: int, table: Table, address: int, *words: int) -> None:
        """Set `words` from `address`; writes there are acknowledged and change nothing."""
        self.set(unit, table, address, *words)
        self._pinned.update((unit, table, address + i) for i in range(len(words)))

    def refuse(self, unit: int, table: Table, addresses: range) -> None:
        self.refused.append((unit, table, addresses))

    def refuse_across(self, unit: int, table: Table, address: int) -> None:
        self.refused_across.append((unit, table, address))

    def then(self, unit: int, *faults: Fault) -> None:
        self._script.setdefault(unit, deque()).extend(faults)

    # --- what was asked -----------------------------------------------------------------------

    def reads(self, unit: int | None = None) -> list[tuple[Table, int, int]]:
        """(table, address, count) of every read, oldest first."""
        return [(c.table, c.address, c.count) for c in self.calls
                if c.op == "read" and unit in (None, c.unit)]

    def writes(self, unit: int | None = None) -> list[tuple[Table, int, tuple[int, ...]]]:
        """(table, address, values) of every write, oldest first."""
        return [(c.table, c.address, c.values) for c in self.calls
                if c.op == "write" and unit in (None, c.unit)]

    # --- PollPort and WritePort ---------------------------------------------------------------

    async def read(
        self, unit: int, request: ReadRequest, priority: Priority = Priority.POLL
    ) -> list[int]:
        call = Call("read", unit, request.table, request.address, request.count,
                    priority=priority)
        self._answer(call)
        return self.get(unit, request.table, request.address, request.count)

    async def write_registers(self, unit: int, address: int, values: Sequence[int]) -> None:
        words = tuple(values)
        assert words, "a write of no registers"
        assert all(0 <= w <= 0xFFFF for w in words), f"not 16-bit words: {words}"
        self._answer(Call("write", unit, "holding", address, len(words), words))
        self._store(unit, "holding", address, words)

    async def write_coil(self, unit: int, address: int, value: bool) -> None:
        self._answer(Call("write", unit, "coil", address, 1, (int(value),)))
        self._store(unit, "coil", address, (int(value),))

    def _store(self, unit: int, table: Table, address: int, words: tuple[int, ...]) -> None:
        for offset, word in enumerate(words):
            if (unit, table, address + offset) not in self._pinned:
                self.set(unit, table, address + offset, word)

    def _answer(self, call: Call) -> None:
        """Log `call`; raise what the scripted device does instead of answering it."""
        self.calls.append(call)
        what = f"fake unit {call.unit}: {call.op} {call.table} {call.address}+{call.count}"
        script = self._script.get(call.unit)
        fault: Fault = script.popleft() if script else "ok"
        if fault == "down" or self.down:
            raise TransportError(f"{what}: connection lost")
        if fault == "silent" or call.unit in self.silent:
            raise NoResponse(f"{what}: no response within {self.timeout:g}s")
        if fault == "busy" or call.unit in self.busy:
            raise _exception(what, 6)
        end = call.address + call.count
        if fault == "refuse" or any(
            unit == call.unit and table == call.table and call.address < r.stop
            and end > r.start
            for unit, table, r in self.refused
        ) or any(
            unit == call.unit and table == call.table and call.address < at < end
            for unit, table, at in self.refused_across
        ):
            raise _exception(what, 2)


def _exception(what: str, code: int) -> DeviceError:
    return DeviceError(f"{what}: Modbus exception {code:02d} ({EXCEPTION_NAMES[code]})",
                       code=code)


class FakeLinePort:
    """A line instrument's port in memory: an InstrumentPort that answers requests itself.

    Every `write` is logged in `written` and answered at once by feeding the attached readers
    the next of `script` (None: no answer) or, once that is empty, `answer`. `send` is the
    instrument talking by itself (streaming, or a late or unsolicited line). `close()` is the
    port lost: `connected` goes False, half-received lines are dropped and a write fails at
    once with TransportError (the real LinePort first waits up to the link timeout for a
    reopen; here nothing reopens unless the test sets `connected` again).
    """

    def __init__(self, link: LineLink, *, answer: bytes | None = None) -> None:
        self.link = link
        self.connected = True
        self.answer = answer
        self.script: deque[bytes | None] = deque()
        self.written: list[bytes] = []
        self.readers: list[LineReader] = []
        self._turn = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def attached(self, reader: LineReader) -> AsyncIterator[None]:
        self.readers.append(reader)
        try:
            yield
        finally:
            self.readers.remove(reader)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        async with self._turn:
            yield

    async def write(self, data: bytes) -> None:
        if not self.connected:
            raise TransportError(f"{self.link.port}: not open")
        self.written.append(data)
        reply = self.script.popleft() if self.script else self.answer
        if reply is not None:
            self.send(reply)

    def send(self, data: bytes, ts: int | None = None) -> None:
        """Bytes from the instrument, received at `ts` (Unix ms; default: now)."""
        stamp = time.time_ns() // 1_000_000 if ts is None else ts
        for reader in self.readers:
            reader.feed(data, stamp)

    def close(self) -> None:
        self.connected = False
        for reader in self.readers:
            reader.reset()


class GridDone(Exception):
    """Raised by FakeGrid's sleep once the test has seen the waits it wanted."""


class FakeGrid:
    """poll_on_grid's clock, sleep and jitter, replaced in bridge.device and core.backoff only.

    Monotonic time moves only while a loop sleeps, and by exactly what it asked; the back-off's
    random factor is always its top (1.0), so a wait after failure n is `interval * 2**(n-1)`,
    capped. After `sleeps` sleeps the loop is ended by GridDone (out of `run()`, inside an
    ExceptionGroup where the loop runs in a TaskGroup). `sleeps_taken` lists the waits.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, sleeps: int) -> None:
        self.now = 500.0
        self.sleeps_taken: list[float] = []
        self._stop_after = sleeps
        monkeypatch.setattr(bridge.device, "time", self)
        monkeypatch.setattr(bridge.device, "asyncio", SimpleNamespace(
            sleep=self.sleep, current_task=asyncio.current_task,
            CancelledError=asyncio.CancelledError))
        monkeypatch.setattr(bridge.core.backoff, "random",
                            SimpleNamespace(uniform=lambda _lo, hi: hi))

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.sleeps_taken.append(round(delay, 9))
        self.now += delay
        if len(self.sleeps_taken) >= self._stop_after:
            raise GridDone


class VirtualClock:
    """Virtual time for several loops at once (FakeGrid serves one): bridge.device's clock and
    sleep, and the line time of a `VirtualBus`.

    A sleep suspends its task until the clock reaches its end; `run_for` lets every task run
    until all of them wait (a fixed number of event loop turns: the code under test reaches its
    next wait in a handful), then jumps to the earliest wake-up, and so on. Nothing really
    sleeps, so an hour of a bus takes milliseconds and the schedule is exact.
    """

    TURNS = 100  # event loop turns that let every task reach its next wait

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = 500.0
        self._timers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()
        monkeypatch.setattr(bridge.device, "time", self)
        monkeypatch.setattr(bridge.device, "asyncio", SimpleNamespace(
            sleep=self.sleep, current_task=asyncio.current_task,
            CancelledError=asyncio.CancelledError))

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        if delay <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._timers, (self.now + delay, next(self._order), fut))
        await fut

    async def run_for(self, seconds: float) -> None:
        end = self.now + seconds
        while True:
            for _ in range(self.TURNS):
                await asyncio.sleep(0)
            if not self._timers or self._timers[0][0] > end:
                self.now = end
                return
            at, _, fut = heapq.heappop(self._timers)
            self.now = max(self.now, at)
            if not fut.done():
                fut.set_result(None)


@dataclass(frozen=True, slots=True)
class Transaction:
    """One read on a VirtualBus: who, and when it held the line."""

    unit: int
    start: float
    end: float


class VirtualBus:
    """A PollPort whose reads take `seconds(request)` of line time on a VirtualClock, one at a
    time through the daemon's own LinkScheduler (priorities, FIFO turns; no silence, so line
    time is all there is). Every unit answers zeros, but those in `silent`, which cost the line
    `timeout` and raise NoResponse; `transactions` logs who held the line."""

    def __init__(self, clock: VirtualClock, seconds: Callable[[ReadRequest], float]) -> None:
        self.clock = clock
        self.seconds = seconds
        self.timeout = 1.0  # only reported (the poller's watchdog bound)
        self.scheduler = LinkScheduler()
        self.silent: set[int] = set()
        self.transactions: list[Transaction] = []

    async def read(
        self, unit: int, request: ReadRequest, priority: Priority = Priority.POLL
    ) -> list[int]:
        async with self.scheduler.turn(priority):
            start = self.clock.now
            silent = unit in self.silent
            await self.clock.sleep(self.timeout if silent else self.seconds(request))
            self.transactions.append(Transaction(unit, start, self.clock.now))
        if silent:
            raise NoResponse(f"virtual unit {unit}: no response within {self.timeout:g}s")
        return [0] * request.count

    def busy(self, since: float, until: float) -> float:
        """Seconds of line time used between `since` and `until`."""
        return sum(max(0.0, min(t.end, until) - max(t.start, since)) for t in self.transactions)
