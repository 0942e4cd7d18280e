"""`DiskBuffer`: the SQLite queue itself: transactions, put, take, ack and requeue.

Rows are stored in SQLite so they survive restarts and power loss, and kept by id until they
are acknowledged; a row is one put()'s messages (a poll's), packed by bridge.buffer.rows in the
table bridge.buffer.schema creates. `DiskBuffer` is made of one state and the mixins that work
on it: the bounds (what to drop, bridge.buffer.bounds), a full disk (bridge.buffer.disk) and
the in-flight spans take() skips (bridge.buffer.spans).
"""

from __future__ import annotations

import bisect
import contextlib
import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import structlog

from bridge.buffer.bounds import Bounds
from bridge.buffer.disk import _SLACK, FullDisk
from bridge.buffer.held import Held
from bridge.buffer.rows import CorruptRow, pack, unpack
from bridge.buffer.schema import INSERT, create, totals
from bridge.buffer.spans import Spans
from bridge.core.messages import Message
from bridge.errors import ConfigError, ConfigIssue

T = TypeVar("T")

log = structlog.get_logger("bridge.buffer")

SYNC_EVERY = 5.0  # seconds between fsyncs of the WAL: the most a power cut can lose
# The newest rows kept in memory as put() was given them, so a live row is taken without
# unpacking it again (about 1 µs a message): polls between two takes of a connected publisher.
# Older ones are forgotten (read back from the disk when taken), and so is every row once taken.
RECENT_ROWS = 32

_SELECT = "SELECT id, count, data FROM batches WHERE id > ? AND id <= ? ORDER BY id LIMIT ?"
_DELETE_IDS = (
    "DELETE FROM batches WHERE id IN (SELECT value FROM json_each(?)) RETURNING count, bytes"
)


@dataclass(frozen=True, slots=True)
class Stored:
    """A buffered row: one put()'s messages, in order, and the row id (the handle for ack /
    requeue: a row is taken, acknowledged and requeued whole)."""

    id: int
    messages: tuple[Message, ...]


class DiskBuffer(Bounds, FullDisk, Held, Spans):
    """The store-and-forward buffer: a bounded, ordered SQLite queue (WAL) with in-flight rows.

    Polling `put()`s each poll's messages as one row in one transaction; the publisher
    `take()`s the oldest rows not in flight, then `ack()`s them (delivered: deleted) or
    `requeue()`s them (to be taken again, ahead of newer rows). In-flight marks live in memory
    only: after a restart every stored row is sent again, so delivery is at-least-once and
    nothing acknowledged is resent. `len()`, `in_flight`, `dropped` and the bounds count
    messages; ids, take() and the in-flight marks go by row.

    Ids come from AUTOINCREMENT, so they only grow, also across restarts: id order is put order,
    and `last_id()` marks "everything stored so far" (the backlog at a reconnect).

    Bounds: `max_messages` messages, `max_bytes` (UTF-8 topic + payload bytes), `max_age`
    seconds of `ts` against `clock`. The oldest rows by id go first, whole (a poll is the unit),
    in flight or not (an ack or requeue of a dropped id is a no-op), and their messages are
    counted in `dropped`. A put() bigger than a bound on its own keeps its newest messages that
    fit. Age is judged from the front by a row's oldest message: expired rows are dropped on
    put() and take() up to the first row that has not expired.

    Durability: WAL with `synchronous=NORMAL`. A commit is in the WAL file when put() returns,
    so a process crash (`kill -9`, OOM) loses nothing that put() accepted. Only the OS page cache
    holds it until the WAL is fsynced, so on power loss the last transactions can be lost (never
    the database: WAL recovery always leaves a consistent state). Syncing every poll would cost
    milliseconds per poll and wear SD cards, so instead at most every `SYNC_EVERY` seconds one
    put() commits with `synchronous=FULL`, which fsyncs the WAL and with it every commit before
    it: a power cut loses at most the readings of about the last `SYNC_EVERY` seconds, plus
    acks of that time (those messages are sent again: at-least-once). While a publisher is live,
    QoS 0 polls are held in memory and written only if not delivered soon (bridge.buffer.held).

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
        monotonic: Callable[[], float] = time.monotonic,
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
            # A page cache of 256 KiB, not SQLite's 2 MiB: live rows are taken soon after they
            # are put, so what is hot is the two ends of one table; the rest is the OS's page
            # cache anyway (bench/buffer.py: no change in CPU; 500 x 30 per-point: -1.8 MiB).
            self._db.execute("PRAGMA cache_size=-256")
            create(self._db, self.path)
            rows, count, size, last_id = totals(self._db)
            wal = self._size_wal(empty=not rows)
        except (OSError, sqlite3.Error) as exc:
            # The state_dir check at start-up catches most of this; what is left (a file that
            # is not a database, a disk that failed since) is still one line, not a traceback.
            why = exc.strerror if isinstance(exc, OSError) else str(exc)
            issue = ConfigIssue(str(self.path), 0, "", f"cannot open the buffer: {why}")
            raise ConfigError([issue]) from None
        self._rows: int = rows
        self._count: int = count  # messages
        self._bytes: int = size
        self._last_id: int = last_id
        self._inflight: dict[int, int] = {}  # row id -> its messages, taken and not yet back
        # No row at the front is older than this (ms), so expiry needs no query before then.
        self._front_ts: float = -float("inf") if rows else float("inf")
        self._uninflight: list[tuple[int, int]] = []  # dropped in flight by this transaction
        self._unacked: set[int] = set()  # acked, but the delete failed: retried with the next ack
        # Ranges [start, end] of ids in which every stored row is in flight: take() skips them
        # without reading the rows. A hint only: take() also filters on _inflight.
        self._starts: list[int] = []
        self._ends: list[int] = []
        self.on_ready = None
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
        self._recent: dict[int, tuple[Message, ...]] = {}  # by row id, oldest first
        self._init_held(monotonic)
        self._init_direct()
        self.dropped = 0
        self.accepted = 0
        self.lost = 0  # messages neither stored nor handed to a connected publisher
        if count:
            log.info("buffer opened with backlog", path=str(self.path), messages=count,
                     bytes=size)


    # --- polling side -----------------------------------------------------------------------

    def put(self, messages: Iterable[Message]) -> None:
        """Store a poll's messages as one row in one transaction, then apply the bounds.
        Never raises."""
        batch = list(messages)
        if not batch or self._hold(batch):
            return
        if not self._room():
            self._refuse(batch)
            return
        blob, size = pack(batch)
        kept: list[Message] = batch
        trimmed: list[str] = []
        if len(batch) > self.max_messages or size > self.max_bytes:
            kept, trimmed = self._fit(batch)
            if not kept:
                self.accepted += len(batch)
                self.dropped += len(batch)
                self._log_dropping(trimmed)
                return
            blob, size = pack(kept)
        oldest = min(m.ts for m in kept)
        row = (self._last_id + 1, len(kept), size, oldest, blob)
        sync = time.monotonic() - self._last_sync >= SYNC_EVERY

        def insert() -> list[str]:
            self._insert_held()  # first: ids in put order, and the bounds see them
            self._db.execute(INSERT, row)
            self._rows += 1
            self._count += len(kept)
            self._bytes += size
            self._last_id = row[0]
            self._front_ts = min(self._front_ts, oldest) if self._rows > 1 else oldest
            self.dropped += len(batch) - len(kept)
            return trimmed + [r for r in self._enforce_bounds() if r not in trimmed]

        try:
            reasons = self._synced(insert) if sync else self._transaction(insert)
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
        self._held_written()
        self.accepted += len(batch)
        self._remember(row[0], tuple(kept))
        if self._failing:
            self._failing = False
            log.info("buffer writes recovered", path=str(self.path), lost=self.lost)
        self._log_dropping(reasons)
        if self.available():
            self._signal()

    def _remember(self, id_: int, messages: tuple[Message, ...]) -> None:
        """Keep a committed row's messages for take() (the newest RECENT_ROWS). A hint: a row
        dropped meanwhile is never selected again (ids are never reused), and what is forgotten
        is read from the disk."""
        recent = self._recent
        recent[id_] = messages
        if len(recent) > RECENT_ROWS:
            del recent[next(iter(recent))]

    def _synced(self, work: Callable[[], T]) -> T:
        """`_transaction(work)`, its commit fsynced (and with it every commit before it)."""
        self._db.execute("PRAGMA synchronous=FULL")
        try:
            return self._transaction(work)
        finally:
            self._db.execute("PRAGMA synchronous=NORMAL")

    def _transaction(self, work: Callable[[], T]) -> T:
        """Run `work` in one write transaction; on failure undo it and its bookkeeping too."""
        saved = (self._rows, self._count, self._bytes, self._last_id, self.dropped,
                 self._front_ts)
        self._uninflight = []
        self._db.execute("BEGIN IMMEDIATE")
        try:
            result = work()
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
            (self._rows, self._count, self._bytes, self._last_id, self.dropped,
             self._front_ts) = saved
            self._inflight.update(self._uninflight)  # dropped in flight, but not after all
            raise
        finally:
            self._uninflight = []
        return result

    # --- publishing side --------------------------------------------------------------------

    def take(self, limit: int, *, after: int = 0, upto: int | None = None) -> list[Stored]:
        """The oldest rows with `after < id <= upto` not in flight, whole, up to `limit`
        messages (at least one row, however many it holds): now in flight."""
        if self._rows <= len(self._inflight) or limit < 1:
            return []  # every stored row is in flight (or none is stored): no query
        if self.max_age and self._rows:
            try:
                cut = self._expired_through()
                if cut:
                    self._freeing(lambda: self._transaction(lambda: self._drop_through(cut)))
                    self._log_dropping(["max_age"])
            except sqlite3.Error as exc:  # sending a stale row beats not sending at all
                log.warning("buffer expiry failed", path=str(self.path), error=str(exc))
        hi = self._last_id if upto is None else min(upto, self._last_id)
        pos, taken, full = after, 0, False
        out: list[Stored] = []
        bad: list[int] = []
        starts, ends = self._starts, self._ends
        while not full and pos < hi:
            i = bisect.bisect_right(starts, pos + 1) - 1
            if i >= 0 and ends[i] >= pos + 1:
                pos = ends[i]  # every stored row up to there is in flight
                continue
            gap_hi = hi if i + 1 >= len(starts) else min(hi, starts[i + 1] - 1)
            try:
                pos, taken, full = self._take_between(pos, gap_hi, limit, taken, out=out,
                                                      bad=bad)
            except sqlite3.Error as exc:  # a failing disk: send what we have, try again later
                log.warning("buffer read failed", path=str(self.path), error=str(exc))
                break
        if bad:
            self.ack(bad)  # deleted like delivered rows (retried like them if that fails)
        return out

    def _take_between(self, pos: int, hi: int, limit: int, taken: int, *, out: list[Stored],
                      bad: list[int]) -> tuple[int, int, bool]:
        """Rows with `pos < id <= hi` into `out` (holding `taken` messages), unreadable ones
        into `bad`, all now in flight: from the disk (one query), then the held rows, which are
        newer. (The id up to which every stored row is in flight now, the messages in `out`,
        whether `limit` is reached.)"""
        held = self._held
        # Every row is held (rows on the disk were all acked): no query to find none.
        on_disk = pos if self._rows == len(held) else min(hi, next(iter(held), hi + 1) - 1)
        covered, full = pos, False
        if pos < on_disk:
            covered, taken, full = self._take_stored(pos, on_disk, limit, taken, out=out,
                                                     bad=bad)
        if not full and covered < hi and covered >= on_disk:
            covered, taken, full = self._take_held(covered, hi, limit, taken, out=out)
        self._add_span(pos + 1, covered)
        return covered, taken, full

    def _take_held(self, pos: int, hi: int, limit: int, taken: int, *,
                   out: list[Stored]) -> tuple[int, int, bool]:
        """`_take_between`'s held rows (`pos < id <= hi`): no query, nothing to unpack."""
        inflight, last = self._inflight, pos
        for id_, row in self._held.items():
            if id_ <= pos:
                continue
            if id_ > hi:
                break
            if id_ not in inflight:
                count = len(row.messages)
                if out and taken + count > limit:
                    return last, taken, True
                out.append(Stored(id_, row.messages))
                taken += count
                inflight[id_] = count
            last = id_
            if taken >= limit:
                return last, taken, True
        return hi, taken, False

    def _take_stored(self, pos: int, hi: int, limit: int, taken: int, *, out: list[Stored],
                     bad: list[int]) -> tuple[int, int, bool]:
        """`_take_between`'s query, over rows on the disk."""
        want = limit - taken  # rows: each holds one message at least
        seen, last, full = 0, pos, False
        inflight, recent = self._inflight, self._recent
        cursor = self._db.execute(_SELECT, (pos, hi, want))
        try:
            for id_, count, data in cursor:
                if id_ not in inflight:
                    if out and taken + count > limit:
                        full = True  # a whole row or none: it waits for the next take
                        break
                    messages = recent.pop(id_, None)
                    try:
                        if messages is None:
                            messages = unpack(data, count)
                        out.append(Stored(id_, messages))
                        taken += count
                    except CorruptRow as exc:
                        bad.append(id_)
                        self._corrupt(id_, count, exc)
                    inflight[id_] = count
                seen += 1
                last = id_
                if taken >= limit:
                    full = True
                    break
        finally:
            cursor.close()  # a statement left running would hold its read snapshot
        covered = hi if not full and seen < want else last
        return covered, taken, full

    def _corrupt(self, id_: int, count: int, exc: CorruptRow) -> None:
        """A row that does not decode: its messages are lost, counted and said, once."""
        self.lost += max(count, 0)
        log.error("buffer row unreadable, its readings are lost", path=str(self.path), row=id_,
                  messages=count, error=str(exc))

    def ack(self, ids: Sequence[int]) -> None:
        """Delivered: delete these rows in one transaction. Unknown or dropped ids are ignored."""
        todo = set(ids) | self._unacked
        if not todo:
            return
        inflight = self._inflight
        if self._held:
            rest = self._release(todo)  # held rows: forgotten, no statement
            for id_ in todo - rest:
                inflight.pop(id_, None)
            todo = rest
            if not todo:
                self._forget_spans()
                return
        try:
            gone = self._freeing(
                lambda: self._db.execute(_DELETE_IDS, (json.dumps(sorted(todo)),)).fetchall())
        except sqlite3.Error as exc:
            # They stay in flight (not sent again by this process); the next ack retries.
            self._unacked = {i for i in todo if i in self._inflight}
            if not self._deleting_failed:
                self._deleting_failed = True
                log.error("buffer delete failed, will retry", path=str(self.path),
                          error=str(exc), pending=len(self._unacked))
            return
        if self._deleting_failed:
            self._deleting_failed = False
            log.info("buffer deletes recovered", path=str(self.path))
        self._unacked = set()
        self._rows -= len(gone)
        self._count -= sum(count for count, _ in gone)
        freed = sum(size for _, size in gone)
        self._bytes -= freed
        self._freed += freed
        for id_ in todo:
            inflight.pop(id_, None)
        self._forget_spans()
        self._shrink()

    @property
    def deletes_pending(self) -> int:
        """Rows delivered whose delete failed (retried with the next ack, or `ack(())`)."""
        return len(self._unacked)

    def requeue(self, ids: Sequence[int]) -> None:
        """Not delivered: no longer in flight; taken again in id order, ahead of newer rows."""
        back = sorted(i for i in ids if i in self._inflight)
        for id_ in back:
            del self._inflight[id_]
            self._split_span(id_)
        self._forget_spans()
        if self.available():
            self._signal()

    def last_id(self) -> int:
        """The highest id stored so far (0 when nothing was ever stored)."""
        return self._last_id

    def __len__(self) -> int:
        """Messages stored (in flight included)."""
        return self._count

    @property
    def in_flight(self) -> int:
        """Messages taken and neither acknowledged nor requeued."""
        return sum(self._inflight.values())

    def _forget_spans(self) -> None:
        if not self._inflight:
            self._starts.clear()
            self._ends.clear()

    def close(self) -> None:
        """Write what is held, checkpoint the WAL into the database file and close."""
        self.end_live(self._live_owner)
        self.lost += self._held_count + len(self._direct)  # nobody is left to publish them
        self._direct.clear()
        try:
            self._freeing(lambda: self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)"))
        except sqlite3.Error as exc:
            log.warning("buffer checkpoint failed", path=str(self.path), error=str(exc))
        finally:
            self._db.close()

    def available(self) -> bool:
        """Whether a row (or a reading it could not store) is there to take."""
        return bool(self._direct) or self._rows > len(self._inflight)

    @property
    def bytes(self) -> int:
        """UTF-8 topic + payload bytes of the stored rows (in flight included)."""
        return self._bytes
