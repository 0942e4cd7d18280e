"""The buffer's table, and the upgrade of a file written with one row per message.

Format 2 (`PRAGMA user_version = 2`) keeps one row per put(): its messages packed in one BLOB
(bridge.buffer.rows) beside the columns the bounds need, so dropping, expiry and counting never
unpack a row. Format 1 (user_version 0: no version was set then) kept one row per message in
table `messages`. A gateway upgraded with a backlog in it loses nothing: at open the old rows
move into the new table, oldest first, in transactions of `_UPGRADE_CHUNK` messages each of
which inserts the new rows and deletes the old ones, so a crash midway leaves every message in
exactly one of the tables (the next open carries on) and a nearly full disk needs room for one
chunk, not for a second copy of the backlog. Old rows are grouped `_UPGRADE_ROW` to a row (they
no longer say which poll they came from), keeping their order; a row takes its last message's
old id, so ids keep growing. Only if an older version ran on this file meanwhile (a downgrade:
it made its table again, with ids from 1) would old ids clash with stored rows; then the old
rows go after every stored one, in their order.
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import structlog

from bridge.buffer.rows import pack
from bridge.core.messages import Message

log = structlog.get_logger("bridge.buffer")

FORMAT = 2
SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    count INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    ts INTEGER NOT NULL,
    data BLOB NOT NULL
)
"""
# count: messages in the row; bytes: their UTF-8 topic + payload bytes (what max_bytes counts);
# ts: the oldest message's ts, epoch ms (what max_age and oldest_ts judge); data: the messages.
INSERT = "INSERT INTO batches (id, count, bytes, ts, data) VALUES (?, ?, ?, ?, ?)"

_UPGRADE_CHUNK = 5000  # old rows moved per transaction
_UPGRADE_ROW = 100  # old rows per new row: a poll's worth of per-point messages


def create(db: sqlite3.Connection, path: Path) -> None:
    """Create the table if there is none, and move format 1 rows into it (`path`: the file,
    for the log)."""
    db.execute(SCHEMA)
    old = db.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'messages'"
    ).fetchone()
    if old is not None:
        try:
            _upgrade(db, path)
        except (sqlite3.Error, ValueError, TypeError) as exc:  # a failing disk, a damaged row
            # Nothing is lost: what did not move stays in the old table, and a later open
            # moves it, ahead of the readings stored meanwhile (their ids are higher).
            log.error("buffer upgrade failed, older readings wait in the old table for the next"
                      " start", path=str(path), error=str(exc))
    if db.execute("PRAGMA user_version").fetchone()[0] != FORMAT:
        db.execute(f"PRAGMA user_version = {FORMAT}")


def totals(db: sqlite3.Connection) -> tuple[int, int, int, int]:
    """(rows, messages, bytes, the highest id ever given) of what is stored."""
    rows, messages, size, max_id = db.execute(
        "SELECT count(*), coalesce(sum(count), 0), coalesce(sum(bytes), 0), coalesce(max(id), 0)"
        " FROM batches"
    ).fetchone()
    seq = db.execute(  # also an old table's, left by a failed upgrade
        "SELECT max(seq) FROM sqlite_sequence WHERE name IN ('batches', 'messages')"
    ).fetchone()[0]
    return rows, messages, size, max(max_id, seq or 0)


def _upgrade(db: sqlite3.Connection, path: Path) -> None:
    """Move the rows of table `messages` (format 1) into `batches`, then drop it."""
    moved = 0
    while True:
        db.execute("BEGIN IMMEDIATE")
        try:
            shift = _shift(db)
            rows = db.execute(
                "SELECT id, topic, payload, qos, retain, ts FROM messages ORDER BY id LIMIT ?",
                (_UPGRADE_CHUNK,),
            ).fetchall()
            if rows:
                db.executemany(INSERT, [_row(rows[i : i + _UPGRADE_ROW], shift)
                                        for i in range(0, len(rows), _UPGRADE_ROW)])
                db.execute("DELETE FROM messages WHERE id <= ?", (rows[-1][0],))
            else:
                # Ids go on from the old table's: nothing acknowledged gets its id again.
                seq = db.execute("SELECT coalesce(max(seq), 0) FROM sqlite_sequence"
                                 " WHERE name IN ('messages', 'batches')").fetchone()[0]
                db.execute("DELETE FROM sqlite_sequence WHERE name = 'batches'")
                db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('batches', ?)",
                           (seq,))
                db.execute("DROP TABLE messages")
                db.execute(f"PRAGMA user_version = {FORMAT}")
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            raise
        if not rows:
            break
        moved += len(rows)
    if moved:
        log.info("buffer upgraded to one row per poll", path=str(path), messages=moved)


def _shift(db: sqlite3.Connection) -> int:
    """What to add to the old ids so they clash with no stored row: 0, unless a stored row's id
    lies within the old table's ids (a downgraded version wrote it): then past every row."""
    clash = db.execute(
        "SELECT max(id) FROM batches WHERE EXISTS (SELECT 1 FROM batches WHERE id BETWEEN"
        " (SELECT min(id) FROM messages) AND (SELECT max(seq) FROM sqlite_sequence"
        " WHERE name = 'messages'))"
    ).fetchone()[0]
    if clash is None:
        return 0
    return int(clash) - int(db.execute("SELECT min(id) FROM messages").fetchone()[0]) + 1


def _row(group: list[tuple[int, str, bytes, int, int, int]], shift: int
         ) -> tuple[int, int, int, int, bytes]:
    messages = [Message(topic, bytes(payload), qos, bool(retain), ts)
                for _, topic, payload, qos, retain, ts in group]
    blob, size = pack(messages)
    return group[-1][0] + shift, len(messages), size, min(m.ts for m in messages), blob
