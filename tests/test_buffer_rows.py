"""The buffer's rows: a poll's messages packed in one BLOB, unreadable rows, and the upgrade of
a file written with one row per message (format 1)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

import bridge.buffer.schema
from bridge.buffer import DiskBuffer
from bridge.buffer.rows import CorruptRow, pack, sizes, unpack
from bridge.core.messages import Message
from tests.helpers import examples

NOW_MS = 1_764_000_000_000

message = st.builds(
    Message,
    topic=st.text(max_size=40),
    payload=st.binary(max_size=60),
    qos=st.integers(0, 2),
    retain=st.booleans(),
    ts=st.integers(-(2**63), 2**63 - 1),
)
polls = st.lists(message, min_size=1, max_size=30)


def open_buffer(path: Path) -> DiskBuffer:
    return DiskBuffer(path, max_messages=10**6, max_bytes=10**9, max_age=10**9)


# --- the row format ----------------------------------------------------------------------------


@settings(max_examples=examples(300))
@given(polls)
def test_a_packed_poll_unpacks_to_the_same_messages(batch: list[Message]) -> None:
    """Any topics (UTF-8), payload bytes, qos, retain and ts come back as they went in, and the
    size is what the bounds count (UTF-8 topic + payload bytes)."""
    blob, size = pack(batch)
    assert unpack(blob, len(batch)) == tuple(batch)
    assert size == sum(sizes(batch)) == sum(len(m.topic.encode()) + len(m.payload) for m in batch)


@settings(max_examples=examples(300))
@given(polls, st.data())
def test_a_damaged_row_raises_corrupt_row_and_nothing_else(
    batch: list[Message], data: st.DataObject
) -> None:
    """Truncated, extended or overwritten, a row decodes to messages or says CorruptRow: never
    another exception, never more bytes than it holds."""
    blob, _ = pack(batch)
    how = data.draw(st.sampled_from(["truncate", "extend", "overwrite", "count"]))
    count = len(batch)
    if how == "truncate":
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    elif how == "extend":
        blob += data.draw(st.binary(min_size=1, max_size=8))
    elif how == "overwrite":
        at = data.draw(st.integers(0, len(blob) - 1))
        blob = blob[:at] + bytes([data.draw(st.integers(0, 255))]) + blob[at + 1:]
    else:
        count = data.draw(st.integers(0, 40).filter(lambda n: n != len(batch)))
    try:
        decoded = unpack(blob, count)
    except CorruptRow:
        return
    assert how == "overwrite"  # the others always break the row
    assert len(decoded) == count


@pytest.mark.parametrize(
    ("blob", "why"),
    [
        (b"", "too short"),
        (b"\x02" + bytes(30), "row format 2"),
        (pack([Message("t", b"p", 1, False, 5)])[0][:-1], "the headers count"),
        (pack([Message("t", b"p", 1, False, 5)])[0].replace(b"\x01t", b"\x01\xff"), "UTF-8"),
        (pack([Message("t", b"p", 1, False, 5)])[0].replace(b"\x00\x01t", b"\x00\x03t"),
         "no qos"),
    ],
)
def test_what_makes_a_row_corrupt_is_said(blob: bytes, why: str) -> None:
    with pytest.raises(CorruptRow, match=why):
        unpack(blob, 1)


def test_an_unreadable_row_is_skipped_logged_once_and_counted_lost(tmp_path: Path) -> None:
    """A damaged row does not stop take(): the rows around it come out, it is deleted, its
    messages are counted in `lost`, and one error line names it."""
    b = open_buffer(tmp_path / "b.db")
    for poll in range(3):
        b.put(Message(f"m2m/gw/d/p{i}", b"%d" % (10 * poll + i), 1, False, NOW_MS)
              for i in range(4))
    b.close()
    db = sqlite3.connect(tmp_path / "b.db")
    with db:  # damaged while the bridge was not running: found when the row is read
        db.execute("UPDATE batches SET data = x'01ff' WHERE id = 2")
    db.close()
    b = open_buffer(tmp_path / "b.db")
    with structlog.testing.capture_logs() as logs:
        taken = b.take(100)
        assert b.take(100) == []
    assert [s.id for s in taken] == [1, 3]
    assert [m.payload for s in taken for m in s.messages] == [
        b"0", b"1", b"2", b"3", b"20", b"21", b"22", b"23"]
    errors = [e for e in logs if e["log_level"] == "error"]
    assert [(e["event"], e["row"], e["messages"]) for e in errors] == [
        ("buffer row unreadable, its readings are lost", 2, 4)]
    assert b.lost == 4
    assert len(b) == 8
    b.ack([1, 3])
    assert len(b) == 0
    assert b._db.execute("SELECT count(*) FROM batches").fetchone()[0] == 0
    b.close()


# --- the upgrade from format 1 -----------------------------------------------------------------

FORMAT_1 = """
CREATE TABLE messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    ts INTEGER NOT NULL
)
"""


def old_buffer(path: Path, backlog: list[Message], *, acked: int) -> None:
    """A buffer file as the one-row-per-message version left it: `acked` messages delivered
    and deleted, then `backlog` waiting (ids acked+1...)."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(FORMAT_1)
    rows = [(i, "m2m/gw/old/p", b"acked", 1, 0, NOW_MS) for i in range(1, acked + 1)]
    rows += [(acked + 1 + i, m.topic, m.payload, m.qos, int(m.retain), m.ts)
             for i, m in enumerate(backlog)]
    db.executemany("INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?)", rows)
    db.execute("DELETE FROM messages WHERE id <= ?", (acked,))
    db.close()


def backlog_of(n: int) -> list[Message]:
    return [Message(f"m2m/gw/m{i % 3}/ü{i % 7}", b'{"value":%d}' % i, i % 2, i % 5 == 0,
                    NOW_MS + i) for i in range(n)]


def test_an_old_backlog_is_upgraded_and_taken_in_order(tmp_path: Path) -> None:
    """A gateway upgraded with a backlog in the old table: every message is there, in order,
    with every field; ids go on from the old ones; the old table is gone."""
    path = tmp_path / "buffer.sqlite3"
    backlog = backlog_of(250)
    old_buffer(path, backlog, acked=40)
    with structlog.testing.capture_logs() as logs:
        b = open_buffer(path)
    assert [(e["event"], e.get("messages")) for e in logs] == [
        ("buffer upgraded to one row per poll", 250),
        ("buffer opened with backlog", 250),
    ]
    assert len(b) == 250
    assert b.bytes == sum(sizes(backlog))
    assert b.oldest_ts == NOW_MS
    assert b.last_id() == 290  # the old ids: nothing delivered gets one again
    taken = b.take(10_000)
    assert [m for s in taken for m in s.messages] == backlog
    assert [len(s.messages) for s in taken] == [100, 100, 50]
    b.ack([s.id for s in taken])
    b.put([Message("m2m/gw/new", b"1", 1, False, NOW_MS)])
    assert b.last_id() == 291
    tables = {r[0] for r in b._db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "messages" not in tables
    assert b._db.execute("PRAGMA user_version").fetchone()[0] == 2
    b.close()


def test_an_upgrade_cut_short_loses_nothing_and_finishes_at_the_next_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk error midway through the upgrade: the buffer opens with what moved (one line
    says so), polling goes on, and the next open moves the rest ahead of newer readings."""
    path = tmp_path / "buffer.sqlite3"
    backlog = backlog_of(120)
    old_buffer(path, backlog, acked=0)
    monkeypatch.setattr(bridge.buffer.schema, "_UPGRADE_CHUNK", 30)
    real = bridge.buffer.schema._row
    calls = 0

    def failing(group: list[tuple[int, str, bytes, int, int, int]], shift: int
                ) -> tuple[int, int, int, int, bytes]:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise sqlite3.OperationalError("disk I/O error")
        return real(group, shift)

    monkeypatch.setattr(bridge.buffer.schema, "_row", failing)
    with structlog.testing.capture_logs() as logs:
        b = open_buffer(path)
    assert [e["event"] for e in logs if e["log_level"] == "error"] == [
        "buffer upgrade failed, older readings wait in the old table for the next start"]
    assert len(b) == 60  # two chunks of 30 moved
    b.put([Message("m2m/gw/new", b"new", 1, False, NOW_MS + 1000)])
    assert b.last_id() == 121  # after every old id
    b.close()
    monkeypatch.setattr(bridge.buffer.schema, "_row", real)
    b = open_buffer(path)
    assert len(b) == 121
    taken = b.take(10_000)
    assert [m for s in taken for m in s.messages] == [
        *backlog, Message("m2m/gw/new", b"new", 1, False, NOW_MS + 1000)]
    b.close()


def test_a_downgrade_and_upgrade_again_loses_nothing(tmp_path: Path) -> None:
    """An older version run on an upgraded file makes its one-row-per-message table again,
    with ids from 1, beside the rows it cannot see; the next upgrade puts its readings after
    them, each once."""
    path = tmp_path / "buffer.sqlite3"
    b = open_buffer(path)
    newer = backlog_of(60)
    for i in range(0, 60, 10):
        b.put(newer[i : i + 10])  # rows 1-6: the old ids 1-5 would clash
    b.close()
    later = [Message("m2m/gw/old/p", b"%d" % n, 1, False, NOW_MS + 1000 + n) for n in range(5)]
    db = sqlite3.connect(path, isolation_level=None)  # the older version, as it would
    db.execute(FORMAT_1.replace("CREATE TABLE", "CREATE TABLE IF NOT EXISTS"))
    db.executemany("INSERT INTO messages (topic, payload, qos, retain, ts) VALUES (?, ?, ?, ?, ?)",
                   [(m.topic, m.payload, m.qos, int(m.retain), m.ts) for m in later])
    db.close()
    b = open_buffer(path)
    assert len(b) == 65
    taken = b.take(10_000)
    assert [m for s in taken for m in s.messages] == newer + later
    assert b.last_id() == 11
    b.close()
