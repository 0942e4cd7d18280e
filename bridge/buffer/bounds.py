"""The buffer's bounds: count, bytes and age, the oldest going first.

When full the oldest go first and are counted, because for telemetry the newest reading is the
one worth keeping. Rows (a put()'s messages each) are dropped whole by id, in flight or not (an
ack or requeue of a dropped id is a no-op): a poll is the unit, so the bounds read the count and
bytes columns and never unpack a row. A single put() bigger than a bound keeps its newest
messages that fit, as a row of its own. Age is judged from the front by a row's oldest message,
so expiry stops at the first row that has not expired. Dropping is logged once when it starts
and once when the buffer is comfortably below its bounds again.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import structlog

from bridge.buffer.held import HeldRow
from bridge.buffer.rows import sizes
from bridge.core.messages import Message

log = structlog.get_logger("bridge.buffer")

_RECOVERED = 0.9  # "no longer dropping" once below 90% of every bound, so the log won't flap

_DELETE_THROUGH = "DELETE FROM batches WHERE id <= ? RETURNING id, count, bytes"


class Bounds:
    """Bounds enforcement of `DiskBuffer`: which rows to drop, and the log of dropping."""

    # Set up by DiskBuffer.__init__.
    path: Path
    max_messages: int
    max_bytes: int
    max_age: float
    clock: Callable[[], float]
    dropped: int
    _db: sqlite3.Connection
    _rows: int
    _count: int
    _bytes: int
    _inflight: dict[int, int]
    _uninflight: list[tuple[int, int]]
    _front_ts: float
    _dropping: bool
    _held: dict[int, HeldRow]

    @property
    def oldest_ts(self) -> int | None:
        """`ts` (epoch ms) of the oldest message of the oldest stored row, None when empty or
        unreadable."""
        if not self._rows:
            return None
        try:
            row = self._db.execute("SELECT ts FROM batches ORDER BY id LIMIT 1").fetchone()
        except sqlite3.Error:  # only logging and metrics ask: not worth failing them
            return None
        if row is None and self._held:  # all of it is held (bridge.buffer.held): newer rows
            return min(m.ts for m in next(iter(self._held.values())).messages)
        return None if row is None else int(row[0])

    def _fit(self, batch: list[Message]) -> tuple[list[Message], list[str]]:
        """The newest messages of a put() that alone exceeds a bound, as many as fit (maybe
        none), and which bounds it exceeded."""
        keep = min(len(batch), max(self.max_messages, 0))
        reasons = ["max_messages"] if keep < len(batch) else []
        each = sizes(batch)
        start = len(batch) - keep
        size = sum(each[start:])
        if size > self.max_bytes:
            reasons.append("max_bytes")
            while start < len(batch) and size > self.max_bytes:
                size -= each[start]
                start += 1
        return batch[start:], reasons

    def _enforce_bounds(self) -> list[str]:
        """Drop the oldest rows beyond the bounds (inside put()'s transaction); which bounds."""
        reasons: list[str] = []
        if self.max_age and self._drop_expired():
            reasons.append("max_age")
        count = self._count - max(self.max_messages, 0)
        size = self._bytes - max(self.max_bytes, 0)
        if count > 0 or size > 0:
            cut = 0
            cursor = self._db.execute("SELECT id, count, bytes FROM batches ORDER BY id")
            for id_, n, b in cursor:
                if count <= 0 and size <= 0:
                    break
                count -= n
                size -= b
                cut = id_
            cursor.close()
            if self._count > self.max_messages:
                reasons.append("max_messages")
            if self._bytes > self.max_bytes:
                reasons.append("max_bytes")
            self._drop_through(cut)
        return reasons

    def _log_dropping(self, reasons: list[str]) -> None:
        """One line when dropping starts, one when the buffer is comfortably below its bounds."""
        if reasons:
            if not self._dropping:
                self._dropping = True
                log.warning("buffer full, dropping the oldest messages", path=str(self.path),
                            bound=",".join(reasons), dropped=self.dropped)
        elif self._dropping and self._below_bounds():
            self._dropping = False
            log.info("buffer no longer dropping", path=str(self.path), dropped=self.dropped)

    def _below_bounds(self) -> bool:
        if self._count > _RECOVERED * self.max_messages:
            return False
        if self._bytes > _RECOVERED * self.max_bytes:
            return False
        if not self.max_age:
            return True
        oldest = self.oldest_ts
        return oldest is None or self.clock() * 1000 - oldest < _RECOVERED * self.max_age * 1000

    def _drop_expired(self) -> bool:
        """Drop the expired rows at the front; True if there were any."""
        cut = self._expired_through()
        if cut:
            self._drop_through(cut)
        return bool(cut)

    def _expired_through(self) -> int:
        """The id of the last row of the front run older than max_age (0: none)."""
        cutoff = (self.clock() - self.max_age) * 1000
        if self._front_ts >= cutoff:
            return 0
        cut = 0
        self._front_ts = float("inf")  # empty
        cursor = self._db.execute("SELECT id, ts FROM batches ORDER BY id")
        for id_, ts in cursor:
            if ts >= cutoff:
                self._front_ts = ts
                break
            cut = id_
        cursor.close()
        return int(cut)

    def _drop_through(self, cut: int) -> None:
        """Delete every row with id <= cut, its messages counted as dropped."""
        gone = self._db.execute(_DELETE_THROUGH, (cut,)).fetchall()
        messages = sum(count for _, count, _ in gone)
        self._rows -= len(gone)
        self._count -= messages
        self._bytes -= sum(size for _, _, size in gone)
        self.dropped += messages
        if self._inflight:
            was = [(id_, self._inflight.pop(id_)) for id_, _, _ in gone if id_ in self._inflight]
            self._uninflight.extend(was)
