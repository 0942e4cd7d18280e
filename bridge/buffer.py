"""The buffer between polling and publishing: bounded, ordered, transactional.

Polling puts messages in and never waits; the publisher takes a batch, and either acknowledges
it (delivered: gone) or returns it (not delivered: back at the front, order kept). This is
Telegraf's transactional output buffer. Bounds are count and bytes; when full the oldest go
first and are counted, because for telemetry the newest reading is the one worth keeping.

`DiskBuffer` is that buffer, stored in SQLite so it survives restarts and power loss; it keeps
rows by id until they are acknowledged.

A full disk must never wedge it. SQLite needs free space even to delete (a WAL frame per
changed page, then the checkpoint), so the buffer stops storing while the disk has less than
`headroom` free, keeps a preallocated `.reserve` file it gives up when a delete or checkpoint
still finds the disk full, and returns freed pages to the file system (incremental vacuum).
What it cannot store goes to the publisher directly while one is connected, else is lost.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import os
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import structlog

from bridge.core.messages import Message
from bridge.errors import ConfigError, ConfigIssue

T = TypeVar("T")

log = structlog.get_logger("bridge.buffer")

SYNC_EVERY = 5.0  # seconds between fsyncs of the WAL: the most a power cut can lose
_RECOVERED = 0.9  # "no longer dropping" once below 90% of every bound, so the log won't flap
MAX_SPANS = 256  # in-flight id ranges remembered before the hint is dropped
DIRECT_MAX = 10_000  # readings held in memory for the publisher while the disk refuses them
# The WAL is checkpointed every `_WAL_SHARE`th of the file system (16 pages at least, SQLite's
# 1000 at most): on a small disk a WAL of SQLite's default size would be most of the disk.
_WAL_SHARE = 64
_MIN_WAL_PAGES = 16
_MAX_WAL_PAGES = 1000
_SLACK = 64 * 1024  # a poll's rows and SQLite's bookkeeping beyond the WAL

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    ts INTEGER NOT NULL
)
"""
# Bytes a row counts against max_bytes: UTF-8 topic plus payload, as _encoded_size computes.
_SIZE = "(length(CAST(topic AS BLOB)) + length(payload))"
_INSERT = "INSERT INTO messages (id, topic, payload, qos, retain, ts) VALUES (?, ?, ?, ?, ?, ?)"
_SELECT = (
    "SELECT id, topic, payload, qos, retain, ts FROM messages"
    " WHERE id > ? AND id <= ? ORDER BY id LIMIT ?"
)
_DELETE_IDS = f"DELETE FROM messages WHERE id IN (SELECT value FROM json_each(?)) RETURNING {_SIZE}"
_DELETE_THROUGH = f"DELETE FROM messages WHERE id <= ? RETURNING id, {_SIZE}"


@dataclass(frozen=True, slots=True)
class Stored:
    """A buffered message with its row id (the handle for ack / requeue)."""

    id: int
    message: Message


class DiskBuffer:
    """The store-and-forward buffer: a bounded, ordered SQLite queue (WAL) with in-flight rows.

    Polling `put()`s each poll's messages in one transaction; the publisher `take()`s the oldest
    rows not in flight, then `ack()`s them (delivered: deleted) or `requeue()`s them (to be taken
    again, ahead of newer rows). In-flight marks live in memory only: after a restart every
    stored row is sent again, so delivery is at-least-once and nothing acknowledged is resent.

    Ids come from AUTOINCREMENT, so they only grow, also across restarts: id order is put order,
    and `last_id()` marks "everything stored so far" (the backlog at a reconnect).

    Bounds: `max_messages` rows, `max_bytes` (UTF-8 topic + payload bytes), `max_age` seconds of
    `ts` against `clock`. The oldest rows by id go first, in flight or not (an ack or requeue of a
    dropped id is a no-op), and are counted in `dropped`. Age is judged from the front: expired
    rows are dropped on put() and take() up to the first row that has not expired.

    Durability: WAL with `synchronous=NORMAL`. A commit is in the WAL file when put() returns,
    so a process crash (`kill -9`, OOM) loses nothing that put() accepted. Only the OS page cache
    holds it until the WAL is fsynced, so on power loss the last transactions can be lost (never
    the database: WAL recovery always leaves a consistent state). Syncing every poll would cost
    milliseconds per poll and wear SD cards, so instead at most every `SYNC_EVERY` seconds one
    put() commits with `synchronous=FULL`, which fsyncs the WAL and with it every commit before
    it: a power cut loses at most the readings of about the last `SYNC_EVERY` seconds, plus
    acks of that time (those messages are sent again: at-least-once).

    A failing disk (full, read-only, I/O error) never raises from put(): the batch goes to the
    publisher directly while one is connected (`direct_to`, taken with `take_direct()`), else
    is counted in `lost`; logged once per change of state, and polling goes on. A full disk is
    judged before SQLite finds it: put() stores nothing while less than `headroom` bytes are
    free (plus the reserve, while it is given up), so deletes, checkpoints and vacuum always
    have room. Not thread-safe: one event loop thread owns it.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_messages: int,
        max_bytes: int,
        max_age: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.max_age = max_age
        self.clock = clock
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None)  # explicit transactions
            # Freed pages go back to the file system (a new file; an old one is converted when
            # empty, below): a drained backlog must give the disk back.
            self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                log.warning("buffer not in WAL mode", path=str(self.path), journal_mode=mode)
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(_SCHEMA)
            count, size, max_id = self._db.execute(
                f"SELECT count(*), coalesce(sum({_SIZE}), 0), coalesce(max(id), 0) FROM messages"
            ).fetchone()
            seq = self._db.execute(
                "SELECT seq FROM sqlite_sequence WHERE name = 'messages'"
            ).fetchone()
            wal = self._size_wal(empty=not count)
        except (OSError, sqlite3.Error) as exc:
            # The state_dir check at start-up catches most of this; what is left (a file that
            # is not a database, a disk that failed since) is still one line, not a traceback.
            why = exc.strerror if isinstance(exc, OSError) else str(exc)
            issue = ConfigIssue(str(self.path), 0, "", f"cannot open the buffer: {why}")
            raise ConfigError([issue]) from None
        self._count: int = count
        self._bytes: int = size
        self._last_id: int = max(max_id, seq[0] if seq else 0)
        self._inflight: set[int] = set()
        # No row at the front is older than this (ms), so expiry needs no query before then.
        self._front_ts: float = -float("inf")
        self._uninflight: list[int] = []  # dropped in flight by the current transaction
        self._unacked: set[int] = set()  # acked, but the delete failed: retried with the next ack
        # Ranges [start, end] of ids in which every stored row is in flight: take() skips them
        # without reading the rows. A hint only: take() also filters on _inflight.
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._ready = asyncio.Event()
        self._last_sync = time.monotonic()
        self._dropping = False
        self._failing = False
        # Free bytes put() leaves alone: the WAL can grow by `wal` before a checkpoint, which
        # can then grow the database by as much. The reserve lets deletes through if the disk
        # fills anyway (another writer, a misjudged size): a WAL's worth of frames.
        self.headroom = 2 * wal + _SLACK
        self.reserve_bytes = wal + _SLACK
        self._reserve = self.path.with_name(self.path.name + ".reserve")
        self._reserved = self._make_reserve()
        self._full = False  # put() refuses for lack of space (one log line per change)
        self._deleting_failed = False
        self._freed = 0  # bytes deleted since the last look at the free pages
        self._direct: deque[Message] = deque()
        # The connected publisher, which takes what put() cannot store (None: nobody, lost).
        self.direct_to: object | None = None
        self.dropped = 0
        self.accepted = 0
        self.lost = 0  # messages neither stored nor handed to a connected publisher
        if count:
            log.info("buffer opened with backlog", path=str(self.path), messages=count,
                     bytes=size)

    def _size_wal(self, *, empty: bool) -> int:
        """Size the WAL to the file system; convert an empty old file to auto_vacuum. Bytes."""
        if empty and self._db.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
            self._db.execute("VACUUM")  # cheap while empty; applies auto_vacuum
        self._page = int(self._db.execute("PRAGMA page_size").fetchone()[0])
        total = self._disk()[0] or 2**63
        self._wal_pages = min(_MAX_WAL_PAGES,
                              max(_MIN_WAL_PAGES, total // _WAL_SHARE // self._page))
        wal = self._wal_pages * self._page
        self._db.execute(f"PRAGMA wal_autocheckpoint={self._wal_pages}")
        self._db.execute(f"PRAGMA journal_size_limit={wal}")  # a reset WAL shrinks to this
        return wal

    # --- polling side -----------------------------------------------------------------------

    def put(self, messages: Iterable[Message]) -> None:
        """Store a poll's messages in one transaction, then apply the bounds. Never raises."""
        batch = list(messages)
        if not batch:
            return
        if not self._room():
            self._refuse(batch)
            return
        first = self._last_id + 1
        rows = [
            (first + i, m.topic, m.payload, m.qos, int(m.retain), m.ts)
            for i, m in enumerate(batch)
        ]
        size = sum(_encoded_size(r[1], r[2]) for r in rows)
        oldest = min(r[5] for r in rows)
        sync = time.monotonic() - self._last_sync >= SYNC_EVERY

        def insert() -> list[str]:
            self._db.executemany(_INSERT, rows)
            self._count += len(rows)
            self._bytes += size
            self._last_id = rows[-1][0]
            self._front_ts = min(self._front_ts, oldest) if self._count > len(rows) else oldest
            return self._enforce_bounds()

        try:
            if sync:
                self._db.execute("PRAGMA synchronous=FULL")
            try:
                reasons = self._transaction(insert)
            finally:
                if sync:
                    self._db.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.Error as exc:
            self._refuse(batch)
            if not self._failing:
                self._failing = True
                log.error("buffer write failed, readings are lost until it recovers",
                          path=str(self.path), error=str(exc), lost=self.lost,
                          published_directly=self.direct_to is not None)
            return
        if sync:
            self._last_sync = time.monotonic()
        self.accepted += len(rows)
        if self._failing:
            self._failing = False
            log.info("buffer writes recovered", path=str(self.path), lost=self.lost)
        self._log_dropping(reasons)
        if self._available():
            self._ready.set()

    def _refuse(self, batch: list[Message]) -> None:
        """Not stored: to the connected publisher (the oldest beyond DIRECT_MAX lost), or lost."""
        if self.direct_to is None:
            self.lost += len(batch)
            return
        self._direct.extend(batch)
        for _ in range(len(self._direct) - DIRECT_MAX):
            self._direct.popleft()
            self.lost += 1
        self._ready.set()

    def _room(self) -> bool:
        """Whether put() may write: `headroom` free, plus a margin to resume (so the log does
        not flap), plus the reserve while it is given up (it is made again first)."""
        free = self._disk()[1]
        if free is None:
            return True  # cannot tell: SQLite will say
        need = self.headroom + (self.reserve_bytes if self._full else 0)
        if not self._reserved:
            need += self.reserve_bytes
        if free < need and self._reserved:
            free += self._free_pages() * self._page  # reused by inserts without growing
        room = free >= need and (self._reserved or self._make_reserve())
        if room == self._full:  # a change of state
            self._full = not room
            if self._full:
                log.warning("buffer disk full, storing nothing until space comes back: readings"
                            " go straight to the broker while it is up, else are lost",
                            path=str(self.path), free_bytes=free, needed_bytes=need,
                            messages=self._count)
            else:
                log.info("buffer disk has room again", path=str(self.path), free_bytes=free,
                         lost=self.lost)
        return room

    def _disk(self) -> tuple[int | None, int | None]:
        """(size, bytes free to us) of the state directory's file system; None if unknown."""
        try:
            st = os.statvfs(self.path.parent)
        except OSError:
            return None, None
        return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize

    def _free_pages(self) -> int:
        try:
            return int(self._db.execute("PRAGMA freelist_count").fetchone()[0])
        except sqlite3.Error:
            return 0

    def _make_reserve(self) -> bool:
        """Preallocate the reserve file (kept across restarts); False if there is no room."""
        try:
            fd = os.open(self._reserve, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                if os.fstat(fd).st_size > self.reserve_bytes:
                    os.ftruncate(fd, self.reserve_bytes)
                os.posix_fallocate(fd, 0, self.reserve_bytes)
            finally:
                os.close(fd)
        except OSError:
            with contextlib.suppress(OSError):
                self._reserve.unlink()
            return False
        return True

    def _freeing(self, work: Callable[[], T]) -> T:
        """Run `work`, which frees space; if the disk is too full even for that, give up the
        reserve and run it once more."""
        try:
            return work()
        except sqlite3.Error as exc:
            if getattr(exc, "sqlite_errorcode", 0) & 0xFF != sqlite3.SQLITE_FULL:
                raise
            if not self._reserved:
                raise
        with contextlib.suppress(OSError):
            self._reserve.unlink()
        self._reserved = False
        log.warning("buffer reserve released: the disk filled up anyway", path=str(self.path),
                    bytes=self.reserve_bytes)
        return work()

    def _shrink(self) -> None:
        """Give free pages back to the file system, a WAL's worth at a time (moving pages costs
        WAL frames); the next checkpoint truncates the file."""
        if self._freed < self._wal_pages * self._page // 2:
            return
        self._freed = 0
        try:
            if self._free_pages() >= self._wal_pages:
                # executescript steps the pragma to its end; execute() frees one page.
                self._freeing(lambda: self._db.executescript(
                    f"PRAGMA incremental_vacuum({self._wal_pages})"))
        except sqlite3.Error as exc:  # the space comes back with a later ack
            log.debug("buffer vacuum failed", path=str(self.path), error=str(exc))

    def _transaction(self, work: Callable[[], T]) -> T:
        """Run `work` in one write transaction; on failure undo it and its bookkeeping too."""
        saved = (self._count, self._bytes, self._last_id, self.dropped, self._front_ts)
        self._uninflight = []
        self._db.execute("BEGIN IMMEDIATE")
        try:
            result = work()
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
            self._count, self._bytes, self._last_id, self.dropped, self._front_ts = saved
            self._inflight.update(self._uninflight)  # dropped in flight, but not after all
            raise
        finally:
            self._uninflight = []
        return result

    # --- publishing side --------------------------------------------------------------------

    async def wait(self) -> None:
        """Return once there is a stored row that is not in flight."""
        while not self._available():
            self._ready.clear()
            await self._ready.wait()

    def take(self, limit: int, *, after: int = 0, upto: int | None = None) -> list[Stored]:
        """The oldest rows with `after < id <= upto` not in flight, up to `limit`: now in flight."""
        if self.max_age and self._count:
            try:
                cut = self._expired_through()
                if cut:
                    self._freeing(lambda: self._transaction(lambda: self._drop_through(cut)))
                    self._log_dropping(["max_age"])
            except sqlite3.Error as exc:  # sending a stale row beats not sending at all
                log.warning("buffer expiry failed", path=str(self.path), error=str(exc))
        hi = self._last_id if upto is None else min(upto, self._last_id)
        pos = after
        out: list[Stored] = []
        inflight = self._inflight
        starts, ends = self._starts, self._ends
        while len(out) < limit and pos < hi:
            i = bisect.bisect_right(starts, pos + 1) - 1
            if i >= 0 and ends[i] >= pos + 1:
                pos = ends[i]  # every stored row up to there is in flight
                continue
            gap_hi = hi if i + 1 >= len(starts) else min(hi, starts[i + 1] - 1)
            want = limit - len(out)
            try:
                rows = self._db.execute(_SELECT, (pos, gap_hi, want)).fetchall()
            except sqlite3.Error as exc:  # a failing disk: send what we have, try again later
                log.warning("buffer read failed", path=str(self.path), error=str(exc))
                break
            for id_, topic, payload, qos, retain, ts in rows:
                if id_ not in inflight:
                    inflight.add(id_)
                    out.append(Stored(id_, Message(topic, payload, qos, bool(retain), ts)))
            covered = gap_hi if len(rows) < want else rows[-1][0]
            self._add_span(pos + 1, covered)
            pos = covered
        return out

    def take_direct(self, limit: int) -> list[Message]:
        """Up to `limit` readings put() could not store, oldest first: the caller's now."""
        return [self._direct.popleft() for _ in range(min(limit, len(self._direct)))]

    def requeue_direct(self, messages: Sequence[Message]) -> None:
        """Not delivered after take_direct(): back at the front (within DIRECT_MAX)."""
        self._direct.extendleft(reversed(messages))
        for _ in range(len(self._direct) - DIRECT_MAX):
            self._direct.pop()
            self.lost += 1
        if self._direct:
            self._ready.set()

    def ack(self, ids: Sequence[int]) -> None:
        """Delivered: delete these rows in one transaction. Unknown or dropped ids are ignored."""
        todo = set(ids) | self._unacked
        if not todo:
            return
        try:
            sizes = self._freeing(
                lambda: self._db.execute(_DELETE_IDS, (json.dumps(sorted(todo)),)).fetchall())
        except sqlite3.Error as exc:
            # They stay in flight (not sent again by this process); the next ack retries.
            self._unacked = todo & self._inflight
            if not self._deleting_failed:
                self._deleting_failed = True
                log.error("buffer delete failed, will retry", path=str(self.path),
                          error=str(exc), pending=len(self._unacked))
            return
        if self._deleting_failed:
            self._deleting_failed = False
            log.info("buffer deletes recovered", path=str(self.path))
        self._unacked = set()
        self._count -= len(sizes)
        freed = sum(s for (s,) in sizes)
        self._bytes -= freed
        self._freed += freed
        self._inflight -= todo
        if not self._inflight:
            self._starts.clear()
            self._ends.clear()
        self._shrink()

    @property
    def deletes_pending(self) -> int:
        """Rows delivered whose delete failed (retried with the next ack, or `ack(())`)."""
        return len(self._unacked)

    @property
    def disk_full(self) -> bool:
        """True while put() stores nothing for lack of disk space."""
        return self._full

    def requeue(self, ids: Sequence[int]) -> None:
        """Not delivered: no longer in flight; taken again in id order, ahead of newer rows."""
        back = [i for i in ids if i in self._inflight]
        self._inflight.difference_update(back)
        for id_ in sorted(back):
            self._split_span(id_)
        if not self._inflight:
            self._starts.clear()
            self._ends.clear()
        if self._available():
            self._ready.set()

    def last_id(self) -> int:
        """The highest id stored so far (0 when nothing was ever stored)."""
        return self._last_id

    def __len__(self) -> int:
        return self._count

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

    @property
    def in_flight(self) -> int:
        """Rows taken and neither acknowledged nor requeued."""
        return len(self._inflight)

    def close(self) -> None:
        """Checkpoint the WAL into the database file and close."""
        self.lost += len(self._direct)  # nobody is left to publish them
        self._direct.clear()
        try:
            self._freeing(lambda: self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)"))
        except sqlite3.Error as exc:
            log.warning("buffer checkpoint failed", path=str(self.path), error=str(exc))
        finally:
            self._db.close()

    # --- bounds -----------------------------------------------------------------------------

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

    # --- in-flight bookkeeping --------------------------------------------------------------

    def _available(self) -> bool:
        return bool(self._direct) or self._count > len(self._inflight)

    def _add_span(self, start: int, end: int) -> None:
        """Remember that every stored row in [start, end] is in flight; merge with neighbours."""
        if end < start:
            return
        starts, ends = self._starts, self._ends
        i = bisect.bisect_left(starts, start)
        if i > 0 and ends[i - 1] >= start - 1:  # touches the one before
            i -= 1
            start = starts[i]
            end = max(end, ends[i])
            del starts[i], ends[i]
        if i < len(starts) and starts[i] <= end + 1:  # touches the one after
            end = max(end, ends[i])
            del starts[i], ends[i]
        starts.insert(i, start)
        ends.insert(i, end)
        if len(starts) > MAX_SPANS:  # fragmented by requeues: forget; take() filters anyway
            starts.clear()
            ends.clear()

    def _split_span(self, id_: int) -> None:
        """`id_` is no longer in flight: take it out of the span holding it."""
        starts, ends = self._starts, self._ends
        i = bisect.bisect_right(starts, id_) - 1
        if i < 0 or ends[i] < id_:
            return
        start, end = starts[i], ends[i]
        del starts[i], ends[i]
        if id_ + 1 <= end:
            starts.insert(i, id_ + 1)
            ends.insert(i, end)
        if start <= id_ - 1:
            starts.insert(i, start)
            ends.insert(i, id_ - 1)

    @property
    def bytes(self) -> int:
        """UTF-8 topic + payload bytes of the stored rows (in flight included)."""
        return self._bytes


def _encoded_size(topic: str, payload: bytes) -> int:
    return (len(topic) if topic.isascii() else len(topic.encode())) + len(payload)
