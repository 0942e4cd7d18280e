"""Serial port carrying plain ASCII lines (`type: serial` links), via pyserial-asyncio-fast.

One `LinePort` per link owns the port: it opens it, reads whatever arrives and hands every
chunk to the `LineReader`s attached to it (one per instrument on the port), each of which
splits lines on its own instrument's `eol`. Requests go out through `write`, one request and
its answer at a time (`transaction`), so two instruments on one RS-485 pair never talk over
each other.

The port lives exactly as long as someone is attached: the first reader opens it, the last
one to leave closes it, so the service needs no extra lifecycle step and a reload that
restarts an instrument reopens its port cleanly.

pyserial's SerialException is an OSError, so `except OSError` covers the port and the OS alike.

A port that vanishes (USB converter unplugged, pty closed) or errs is closed and reopened
after a jittered exponential back-off, forever: an instrument that comes back is picked up
without a restart. While it is closed, `write` fails at once with TransportError, so a poll
costs nothing and the poller counts a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog
from serial_asyncio_fast import open_serial_connection

from bridge.core.backoff import backoff
from bridge.errors import TransportError

if TYPE_CHECKING:
    from bridge.config import LineLink

log = structlog.get_logger("bridge.line")

BACKOFF_BASE = 0.5
READ_SIZE = 4096
MAX_LINE = 4096  # an eol missing this long means we are not reading lines: drop, count
MAX_QUEUED = 1000  # lines nobody asked for (chatty instrument, no request pending)


@dataclass(frozen=True, slots=True)
class Line:
    """One received line, without its eol; `ts` is its arrival in Unix epoch milliseconds."""

    data: bytes
    ts: int


class LineReader:
    """Lines for one instrument, split on its `eol`, queued until the poller takes them."""

    def __init__(self, eol: bytes, *, max_line: int = MAX_LINE, max_queued: int = MAX_QUEUED):
        if not eol:
            raise ValueError("eol must not be empty")
        self.eol = eol
        self.max_line = max_line
        self.overflows = 0  # lines lost to MAX_LINE or a full queue
        self._partial = b""
        self._queue: asyncio.Queue[Line] = asyncio.Queue(max_queued)

    def feed(self, data: bytes, ts: int) -> None:
        """Take a chunk off the port; queue every complete line in it."""
        *lines, self._partial = (self._partial + data).split(self.eol)
        for line in lines:
            self._put(Line(line, ts))
        if len(self._partial) > self.max_line:
            self._partial = b""
            self.overflows += 1

    def reset(self) -> None:
        """The port closed: a half-received line will never be completed."""
        self._partial = b""

    def _put(self, line: Line) -> None:
        if self._queue.full():  # keep the newest: a stale reading is worth less than a fresh one
            self._queue.get_nowait()
            self.overflows += 1
        self._queue.put_nowait(line)

    async def get(self) -> Line:
        return await self._queue.get()

    def take_all(self) -> list[Line]:
        """Every queued line, oldest first, without waiting."""
        lines = []
        while not self._queue.empty():
            lines.append(self._queue.get_nowait())
        return lines


class LinePort:
    """One serial port of a `type: serial` link, shared by the instruments on it."""

    def __init__(self, link: LineLink, *, backoff_cap: float = 30.0) -> None:
        self.link = link
        self.backoff_cap = backoff_cap
        self.opens = 0  # successful opens, so tests and stats can see a reopen happen
        self._readers: list[LineReader] = []
        self._writer: asyncio.StreamWriter | None = None
        self._open = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._turn = asyncio.Lock()
        self._log = log.bind(link=link.name, port=link.port)

    @property
    def connected(self) -> bool:
        return self._writer is not None

    @contextlib.asynccontextmanager
    async def attached(self, reader: LineReader) -> AsyncIterator[None]:
        """Feed `reader` while inside; the port is open while anyone is attached."""
        self._readers.append(reader)
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"serial {self.link.name}")
        try:
            yield
        finally:
            self._readers.remove(reader)
            if not self._readers and self._task is not None:
                task, self._task = self._task, None
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        """One request and its answer at a time on this port."""
        async with self._turn:
            yield

    async def write(self, data: bytes) -> None:
        """Send `data`; wait up to the link timeout for the port to be open (just attached,
        or reopening) rather than failing a poll that a moment's patience would save."""
        if self._writer is None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.link.timeout):  # keeps a cancel, unlike wait_for
                    await self._open.wait()
        writer = self._writer
        if writer is None:
            raise TransportError(f"{self.link.port}: not open")
        try:
            writer.write(data)
            await asyncio.wait_for(writer.drain(), self.link.timeout)
        except (OSError, TimeoutError) as exc:
            raise TransportError(f"{self.link.port}: write failed: {exc}") from None

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                reader, writer = await open_serial_connection(
                    url=self.link.port,
                    baudrate=self.link.baudrate,
                    parity=self.link.parity,  # pyserial's PARITY_* are these letters
                    stopbits=self.link.stopbits,
                    bytesize=self.link.bytesize,
                )
            except (OSError, ValueError) as exc:  # pyserial: ValueError for a bad port URL
                failures += 1
                if failures == 1:
                    self._log.warning("serial port cannot be opened", error=str(exc))
                await asyncio.sleep(self._backoff(failures))
                continue
            self.opens += 1
            self._writer = writer
            self._open.set()
            self._log.info("serial port open")
            try:
                got_data = await self._pump(reader)
            finally:  # also when the last reader leaves: the port is released for others
                self._writer = None
                self._open.clear()
                writer.close()
                for line_reader in self._readers:
                    line_reader.reset()
            # A port that opens and dies at once (a half-enumerated USB device) must not be
            # reopened in a tight loop: only a port that carried data resets the back-off.
            failures = 1 if got_data else failures + 1
            await asyncio.sleep(self._backoff(failures))

    async def _pump(self, reader: asyncio.StreamReader) -> bool:
        """Hand everything read to the readers until the port fails; whether any data came."""
        got_data = False
        try:
            while True:
                chunk = await reader.read(READ_SIZE)
                if not chunk:
                    self._log.warning("serial port closed")
                    return got_data
                got_data = True
                ts = time.time_ns() // 1_000_000
                for line_reader in self._readers:
                    line_reader.feed(chunk, ts)
        except OSError as exc:
            self._log.warning("serial port lost", error=str(exc))
            return got_data

    def _backoff(self, failures: int) -> float:
        return backoff(failures, first=BACKOFF_BASE, cap=self.backoff_cap)
