"""A full or failing disk never wedges the buffer.

SQLite needs free space even to delete (a WAL frame per changed page, then the checkpoint), so
the buffer stops storing while the disk has less than `headroom` free, keeps a preallocated
`.reserve` file it gives up when a delete or checkpoint still finds the disk full, and returns
freed pages to the file system (incremental vacuum). What it cannot store goes to the publisher
directly while one is connected, else is lost.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import structlog

from bridge.core.messages import Message

T = TypeVar("T")

log = structlog.get_logger("bridge.buffer")

DIRECT_MAX = 10_000  # readings held in memory for the publisher while the disk refuses them
# The WAL is checkpointed every `_WAL_SHARE`th of the file system (16 pages at least, SQLite's
# 1000 at most): on a small disk a WAL of SQLite's default size would be most of the disk.
_WAL_SHARE = 64
_MIN_WAL_PAGES = 16
_MAX_WAL_PAGES = 1000
_SLACK = 64 * 1024  # a poll's row and SQLite's bookkeeping beyond the WAL


class FullDisk:
    """The disk-space guard of `DiskBuffer`: WAL sizing, headroom, the reserve, freeing, and
    the readings it could not store (`direct_to`, `take_direct()`)."""

    # Set up by DiskBuffer.__init__.
    path: Path
    headroom: int
    reserve_bytes: int
    direct_to: object | None
    lost: int
    _db: sqlite3.Connection
    _count: int
    _page: int
    _wal_pages: int
    _reserve: Path
    _reserved: bool
    _full: bool
    _freed: int
    _direct: deque[Message]
    # Called whenever a row becomes available to take: the publisher's wake-up (a callback,
    # so a waiting publisher costs no task of its own per wait).
    on_ready: Callable[[], None] | None

    def _init_direct(self) -> None:
        self._direct = deque()
        # The connected publisher, which takes what put() cannot store (None: nobody, lost).
        self.direct_to = None

    def _signal(self) -> None:
        """Something can be taken now: wake whoever waits."""
        if self.on_ready is not None:
            self.on_ready()

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

    # --- what put() could not store ----------------------------------------------------------

    def _refuse(self, batch: list[Message]) -> None:
        """Not stored: to the connected publisher (the oldest beyond DIRECT_MAX lost), or lost."""
        if self.direct_to is None:
            self.lost += len(batch)
            return
        self._direct.extend(batch)
        for _ in range(len(self._direct) - DIRECT_MAX):
            self._direct.popleft()
            self.lost += 1
        self._signal()

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
            self._signal()

    @property
    def disk_full(self) -> bool:
        """True while put() stores nothing for lack of disk space."""
        return self._full
