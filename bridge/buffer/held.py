"""Held rows: QoS 0 polls a connected publisher takes at once are not written to the disk.

Storing a poll and deleting it a millisecond later, once its QoS 0 messages are on the
connection, was the biggest part of a per-point QoS 0 message's cost (bench/peers.py, py-spy:
the insert, the delete and packing the row). While a publisher is live (connected, its
connect-time steps done: `go_live()`), a poll whose messages are all QoS 0 is held in memory
as a row like any other (same id, counted in `len()`, taken, acked and requeued the same way)
and written only if it is still there when:

- a poll that is not held comes (QoS 1, no publisher, or the limits below): held rows are
  written first, in the same transaction, so ids stay in put order and every held row is newer
  than every row on the disk;
- the publisher is no longer live (`end_live()`: the connection dropped, or a stop), or the
  buffer closes;
- the held rows would be more than `HOLD_MAX` messages, or the oldest was held more than
  `HOLD_AGE` seconds ago (a publisher that is not keeping up is not a live one).

What this gives up: a process crash (`kill -9`, OOM) loses what is held, at most `HOLD_MAX`
QoS 0 readings of the last `HOLD_AGE` seconds that a connected publisher was about to write to
the connection. A QoS 0 message counts as delivered once written (DESIGN.md), so this is the
same promise made a moment earlier; a power cut already loses up to `SYNC_EVERY` seconds of
stored rows. QoS 1 readings are always written before put() returns: they stay at-least-once.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import structlog

from bridge.buffer.rows import pack, sizes
from bridge.buffer.schema import INSERT
from bridge.core.messages import Message

log = structlog.get_logger("bridge.buffer")

HOLD_MAX = 2_000  # messages held at most: four wire batches (bridge.mqtt.session.WIRE_BATCH)
HOLD_AGE = 1.0  # seconds a held row may wait to be taken and delivered before it is written
# A buffer that ages readings out within this many seconds judges every row on the disk
# (expiry reads the stored rows only).
HOLD_MIN_MAX_AGE = 60.0


class HeldRow(NamedTuple):
    messages: tuple[Message, ...]
    size: int  # as the bounds count it
    since: float  # monotonic() when held


class Held:
    """The held rows of `DiskBuffer` (see the module docstring)."""

    # Set up by DiskBuffer.__init__.
    path: Path
    max_messages: int
    max_bytes: int
    max_age: float
    monotonic: Callable[[], float]  # how long a row is held: not the wall clock, which jumps
    accepted: int
    _db: sqlite3.Connection
    _rows: int
    _count: int
    _bytes: int
    _last_id: int
    _front_ts: float
    _full: bool
    _failing: bool
    _held: dict[int, HeldRow]  # by id, oldest first; every id above every stored row's
    _held_count: int  # messages in _held
    _live_owner: object | None

    # Methods of the other parts of DiskBuffer.
    _signal: Callable[[], None]
    _room: Callable[[], bool]
    _remember: Callable[[int, tuple[Message, ...]], None]
    _transaction: Callable[[Callable[[], None]], None]

    def _init_held(self, monotonic: Callable[[], float]) -> None:
        self.monotonic = monotonic
        self._held = {}
        self._held_count = 0
        self._live_owner = None

    def go_live(self, owner: object) -> None:
        """`owner`, a connected publisher, takes live rows as they come: QoS 0 polls are held."""
        self._live_owner = owner

    def end_live(self, owner: object) -> None:
        """`owner` takes no more live rows: what is held is written now (if the disk can)."""
        if self._live_owner is owner:
            self._live_owner = None
        self._write_held()

    def _hold(self, batch: list[Message]) -> bool:
        """Hold a poll for the live publisher instead of writing it; False: write it."""
        if self._live_owner is None or self._full or self._failing:
            return False
        n = len(batch)
        held = self._held
        now = self.monotonic()
        if held and (self._held_count + n > HOLD_MAX
                     or now - next(iter(held.values())).since > HOLD_AGE):
            return False
        if n > HOLD_MAX or (self.max_age and self.max_age < HOLD_MIN_MAX_AGE):
            return False
        for m in batch:
            if m.qos:
                return False
        size = sum(sizes(batch))
        if self._count + n > self.max_messages or self._bytes + size > self.max_bytes:
            return False  # the bounds drop rows on the disk: let put() do it
        id_ = self._last_id + 1
        held[id_] = HeldRow(tuple(batch), size, now)
        self._held_count += n
        self._last_id = id_
        self._rows += 1
        self._count += n
        self._bytes += size
        self.accepted += n
        self._signal()
        return True

    def _insert_held(self) -> None:
        """Write every held row (inside the caller's transaction; `_held_written()` after it
        commits)."""
        for id_, row in self._held.items():
            oldest = min(m.ts for m in row.messages)
            blob, size = pack(row.messages)
            self._db.execute(INSERT, (id_, len(row.messages), size, oldest, blob))
            self._front_ts = min(self._front_ts, oldest)

    def _held_written(self) -> None:
        for id_, row in self._held.items():
            self._remember(id_, row.messages)
        self._held.clear()
        self._held_count = 0

    def _write_held(self) -> None:
        """Write what is held, in one transaction; kept in memory if the disk cannot take it
        (taken at the next connection, or lost at close, counted)."""
        if not self._held or not self._room():
            return
        try:
            self._transaction(self._insert_held)
        except sqlite3.Error as exc:
            log.error("buffer write of held readings failed", path=str(self.path),
                      error=str(exc), messages=self._held_count)
            return
        self._held_written()

    def _release(self, ids: set[int]) -> set[int]:
        """Acked: forget the held rows among `ids`; the ids left are on the disk (or unknown)."""
        held = self._held
        rest: set[int] = set()
        for id_ in ids:
            row = held.pop(id_, None)
            if row is None:
                rest.add(id_)
                continue
            n = len(row.messages)
            self._held_count -= n
            self._rows -= 1
            self._count -= n
            self._bytes -= row.size
        return rest
