"""The buffer's bounds: count, bytes and age, the oldest going first.

When full the oldest go first and are counted, because for telemetry the newest reading is the
one worth keeping. Rows are dropped by id, in flight or not (an ack or requeue of a dropped id
is a no-op); age is judged from the front, so expiry stops at the first row that has not
expired. Dropping is logged once when it starts and once when the buffer is comfortably below
its bounds again.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import structlog

log = structlog.get_logger("bridge.buffer")

_RECOVERED = 0.9  # "no longer dropping" once below 90% of every bound, so the log won't flap

# Bytes a row counts against max_bytes: UTF-8 topic plus payload, as _encoded_size computes.
_SIZE = "(length(CAST(topic AS BLOB)) + length(payload))"
_DELETE_THROUGH = f"DELETE FROM messages WHERE id <= ? RETURNING id, {_SIZE}"


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
    _count: int
    _bytes: int
    _inflight: set[int]
    _uninflight: list[int]
    _front_ts: float
    _dropping: bool

    @property
    def oldest_ts(self) -> int | None:
        """`ts` (epoch ms) of the oldest stored row, None when empty or unreadable."""
        if not self._count:
            return None
        try:
            row = self._db.execute("SELECT ts FROM messages ORDER BY id LIMIT 1").fetchone()
        except sqlite3.Error:  # only logging and metrics ask: not worth failing them
            return None
        return None if row is None else int(row[0])

    def _enforce_bounds(self) -> list[str]:
        """Drop the oldest rows beyond the bounds (inside put()'s transaction); which bounds."""
        reasons: list[str] = []
        if self.max_age and self._drop_expired():
            reasons.append("max_age")
        if self._count > self.max_messages:
            excess = self._count - max(self.max_messages, 0)
            row = self._db.execute(
                "SELECT id FROM messages ORDER BY id LIMIT 1 OFFSET ?", (excess - 1,)
            ).fetchone()
            self._drop_through(row[0])
            reasons.append("max_messages")
        if self._bytes > self.max_bytes:
            excess = self._bytes - max(self.max_bytes, 0)
            freed, cut = 0, 0
            for id_, size in self._db.execute(f"SELECT id, {_SIZE} FROM messages ORDER BY id"):
                freed += size
                cut = id_
                if freed >= excess:
                    break
            self._drop_through(cut)
            reasons.append("max_bytes")
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
        cursor = self._db.execute("SELECT id, ts FROM messages ORDER BY id")
        for id_, ts in cursor:
            if ts >= cutoff:
                self._front_ts = ts
                break
            cut = id_
        cursor.close()
        return int(cut)

    def _drop_through(self, cut: int) -> None:
        """Delete every row with id <= cut, counted as dropped."""
        gone = self._db.execute(_DELETE_THROUGH, (cut,)).fetchall()
        self._count -= len(gone)
        self._bytes -= sum(size for _, size in gone)
        self.dropped += len(gone)
        if self._inflight:
            was = [id_ for id_, _ in gone if id_ in self._inflight]
            self._inflight.difference_update(was)
            self._uninflight.extend(was)


def _encoded_size(topic: str, payload: bytes) -> int:
    return (len(topic) if topic.isascii() else len(topic.encode())) + len(payload)
