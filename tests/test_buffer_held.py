"""Held rows: while a publisher is live, QoS 0 polls skip the disk unless they must wait.

What is on the disk is read with a second SQLite connection, as a restart after `kill -9`
would find it (tests/test_buffer.py shows a killed process keeps every committed row).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge.buffer import DiskBuffer
from bridge.buffer.held import HOLD_AGE, HOLD_MAX
from bridge.core.messages import Message
from tests.test_buffer import Clock, ids, messages, open_buffer

OWNER = object()  # stands for the connected publisher


def poll(n: int, *, qos: int = 0, points: int = 100) -> list[Message]:
    """Poll `n`'s per-point messages."""
    return [
        Message(f"m2m/gw/meter/p{i}", b'{"value":%d}' % (n * 1000 + i), qos, False,
                1_764_000_000_000 + n * 1000 + i)
        for i in range(points)
    ]


def on_disk(path: Path) -> list[int]:
    """The row ids a restart would find."""
    db = sqlite3.connect(path)
    try:
        return [row[0] for row in db.execute("SELECT id FROM batches ORDER BY id")]
    finally:
        db.close()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "buffer.db"


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def live(path: Path, clock: Clock) -> Iterator[DiskBuffer]:
    """A buffer whose publisher is live; `clock` times how long a row is held."""
    b = open_buffer(path, monotonic=clock)
    b.go_live(OWNER)
    yield b
    b.close()


def test_a_live_qos0_poll_goes_out_without_a_statement(live: DiskBuffer, path: Path) -> None:
    """Put, take and ack of a QoS 0 poll while live cost no SQL at all, and the buffer says
    what it holds meanwhile."""
    seen: list[str] = []
    live._db.set_trace_callback(seen.append)
    readings = poll(1)
    live.put(readings)
    assert len(live) == 100
    assert live.oldest_ts == readings[0].ts
    taken = live.take(500)
    assert messages(taken) == readings
    assert live.in_flight == 100
    live.ack(ids(taken))
    assert seen == ["SELECT ts FROM batches ORDER BY id LIMIT 1"]  # oldest_ts asked the disk
    assert (len(live), live.bytes, live.in_flight, live.accepted) == (0, 0, 0, 100)
    assert on_disk(path) == []


def test_held_rows_are_written_when_the_publisher_leaves(live: DiskBuffer, path: Path) -> None:
    """A connection drop (end_live) writes every held row, in flight or not, in order: a crash
    after it loses nothing; the publisher's retry finds them."""
    for n in range(3):
        live.put(poll(n))
    first = live.take(100)  # in flight as the connection drops
    assert on_disk(path) == []
    live.end_live(OWNER)
    assert on_disk(path) == [1, 2, 3]
    live.requeue(ids(first))
    assert messages(live.take(1000)) == poll(0) + poll(1) + poll(2)


def test_a_qos1_poll_is_written_at_once_behind_what_was_held(
    live: DiskBuffer, path: Path
) -> None:
    """QoS 1 stays at-least-once while live: on the disk when put() returns, the held QoS 0
    rows before it (ids in put order)."""
    live.put(poll(0))
    live.put(poll(1, qos=1))
    assert on_disk(path) == [1, 2]
    live.put(poll(2))  # held again: every held row is newer than every stored one
    assert on_disk(path) == [1, 2]
    taken = live.take(1000)
    assert ids(taken) == [1, 2, 3]
    assert messages(taken) == poll(0) + poll(1, qos=1) + poll(2)
    live.ack(ids(taken))
    assert on_disk(path) == []
    assert len(live) == 0


def test_a_row_not_delivered_within_hold_age_is_written(
    live: DiskBuffer, path: Path, clock: Clock
) -> None:
    """A publisher that is connected but not delivering (a stalled broker) is not live: its
    held rows go to the disk with the next poll after HOLD_AGE."""
    live.put(poll(0))
    stuck = live.take(100)  # written to a connection that does not drain
    clock.now += HOLD_AGE / 2
    live.put(poll(1))
    assert on_disk(path) == []
    clock.now += HOLD_AGE
    live.put(poll(2))
    assert on_disk(path) == [1, 2, 3]
    live.ack(ids(stuck))  # delivered after all: deleted from the disk like any row
    assert on_disk(path) == [2, 3]
    assert messages(live.take(1000)) == poll(1) + poll(2)


def test_a_wall_clock_stepped_back_keeps_no_row_held(path: Path) -> None:
    """NTP stepping the clock back an hour does not hold a row for an hour: holding is timed
    on the monotonic clock."""
    wall, monotonic = Clock(), Clock()
    b = open_buffer(path, clock=wall, monotonic=monotonic)
    try:
        b.go_live(OWNER)
        b.put(poll(0))
        b.take(100)
        wall.now -= 3600
        monotonic.now += 2 * HOLD_AGE
        b.put(poll(1))
        assert on_disk(path) == [1, 2]
    finally:
        b.close()


def test_no_more_than_hold_max_messages_are_held(live: DiskBuffer, path: Path) -> None:
    polls = HOLD_MAX // 100
    for n in range(polls):
        live.put(poll(n))
    assert on_disk(path) == []
    live.put(poll(polls))
    assert on_disk(path) == list(range(1, polls + 2))


def test_nothing_is_held_without_a_live_publisher_or_with_a_short_max_age(
    path: Path, tmp_path: Path
) -> None:
    b = open_buffer(path)
    try:
        b.put(poll(0))  # no publisher: stored
        b.go_live(OWNER)
        b.end_live(object())  # another publisher's end (a reload's old one) changes nothing
        b.put(poll(1))
        assert on_disk(path) == [1]
        b.end_live(OWNER)  # writes what was held
        assert on_disk(path) == [1, 2]
        b.put(poll(2))  # no publisher: stored
        assert on_disk(path) == [1, 2, 3]
    finally:
        b.close()
    short = tmp_path / "short.db"
    b = open_buffer(short, max_age=30)  # expiry reads the disk: nothing may hide from it
    try:
        b.go_live(OWNER)
        b.put(poll(0))
        assert on_disk(short) == [1]
    finally:
        b.close()


def test_close_writes_what_is_held(live: DiskBuffer, path: Path) -> None:
    """A stop whose flush was cut short keeps the held rows for the next run."""
    live.put(poll(0))
    live.take(100)
    live.put(poll(1))
    live.close()
    b = open_buffer(path)
    try:
        assert messages(b.take(1000)) == poll(0) + poll(1)
        assert b.lost == 0
    finally:
        b.close()


def test_held_rows_within_the_bounds_only(path: Path) -> None:
    """A poll the bounds would drop rows for is not held: put() drops on the disk, counted."""
    b = open_buffer(path, max_messages=250)
    try:
        b.go_live(OWNER)
        b.put(poll(0))
        b.put(poll(1))
        assert on_disk(path) == []
        b.put(poll(2))  # 300 > 250: the held rows are written, then the oldest dropped
        assert on_disk(path) == [2, 3]
        assert b.dropped == 100
        assert messages(b.take(1000)) == poll(1) + poll(2)
    finally:
        b.close()


def test_once_the_disk_is_drained_taking_held_rows_asks_it_nothing(path: Path) -> None:
    """Rows stored before the connection, delivered and deleted, leave ids below the held ones:
    taking the held rows still runs no query."""
    b = open_buffer(path)
    try:
        b.put(poll(0))  # before the connection: stored
        b.ack(ids(b.take(100)))
        b.go_live(OWNER)
        seen: list[str] = []
        b._db.set_trace_callback(seen.append)
        b.put(poll(1))
        taken = b.take(500, after=0)
        assert messages(taken) == poll(1)
        b.ack(ids(taken))
        assert seen == []
    finally:
        b.close()
