"""The publisher against a fake broker (tests/fakewire.py): no broker, process or socket.

What a user sees on the bus: the gateway's `online` and every device's status on each connect,
readings that are never lost across failed batches and dropped connections (the buffer is a
real SQLite DiskBuffer in tmp_path), a backlog replayed at its pace behind live readings,
reconnects that back off and log once per change, a clean stop that says `offline`, commands
that reach their handler and replies that say whether they went out.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
import structlog

import bridge.mqtt.connection
from bridge.buffer import DiskBuffer
from bridge.config import BufferSettings, MqttSettings
from bridge.core.messages import Message
from bridge.mqtt.publisher import Publisher
from bridge.mqtt.wireevents import Incoming, VersionRefused, WireError
from tests.fakewire import FakeBroker, eventually, running

PREFIX = "m2m/gw"
STATUS = f"{PREFIX}/status"
TOPIC = f"{PREFIX}/meter/v"
SET = f"{PREFIX}/+/+/set"
BATCH = 10  # the fake sessions' batch: the publisher takes this many messages at once
UNREACHABLE = WireError("cannot connect to broker.test:1883: Connection refused")
LOGIN_REFUSED = WireError(
    "broker refused the connection: not authorized (135)", reason_code=135
)


def settings(*, replay_rate: int = 1000, protocol: Literal["auto", 5, "3.1.1"] = "auto"
             ) -> MqttSettings:
    return MqttSettings(host="broker.test", client_id="unit", topic_prefix=PREFIX,
                        buffer=BufferSettings(replay_rate=replay_rate), protocol=protocol)


VERSION_REFUSED = VersionRefused(
    "the broker does not speak MQTT 5 (it answered with an MQTT 3.1.1 CONNACK, return code 1)")


def reading(n: int, *, retain: bool = False, age_ms: int = 0) -> Message:
    return Message(TOPIC, b"%d" % n, 1, retain, time.time_ns() // 1_000_000 - age_ms)


def summary(broker: FakeBroker, connection: int) -> list[tuple[str, bytes]]:
    return [(p.topic, p.payload) for p in broker.on(connection)]


@pytest.fixture
def broker(monkeypatch: pytest.MonkeyPatch) -> FakeBroker:
    """A fake broker the publisher connects to; reconnects come without a back-off wait."""
    monkeypatch.setattr(bridge.mqtt.connection, "RECONNECT_BASE", 0.0)
    return FakeBroker(batch=BATCH).install(monkeypatch)


@pytest.fixture
def buffer(tmp_path: Path) -> Iterator[DiskBuffer]:
    buf = DiskBuffer(tmp_path / "buffer.sqlite3", max_messages=100_000, max_bytes=10**8,
                     max_age=86400)
    yield buf
    buf.close()


async def connected(publisher: Publisher) -> None:
    await eventually(publisher.connected.is_set, what="the publisher to connect")


# ------------------------------------------------------------------ statuses


async def test_each_connect_says_online_subscribes_then_publishes_every_device_status(
    broker: FakeBroker, buffer: DiskBuffer
) -> None:
    publisher = Publisher(settings(), buffer, subscriptions=[SET], on_message=lambda _: None)
    publisher.set_status("pump", False)
    publisher.set_status("meter", True)
    async with running(publisher):
        await eventually(lambda: len(broker.on(1)) == 3)
        assert broker.wills == [STATUS]  # the last will says `offline` if we vanish
        assert broker.events[:5] == [
            "connect", f"publish {STATUS}", f"subscribe {SET}",
            f"publish {PREFIX}/meter/status", f"publish {PREFIX}/pump/status",
        ]
        assert [(p.topic, p.payload, p.qos, p.retain) for p in broker.on(1)] == [
            (STATUS, b"online", 1, True),
            (f"{PREFIX}/meter/status", b"online", 1, True),
            (f"{PREFIX}/pump/status", b"offline", 1, True),
        ]
        publisher.set_status("pump", True)  # a change while connected goes out at once
        await eventually(lambda: len(broker.on(1)) == 4)
        assert summary(broker, 1)[-1] == (f"{PREFIX}/pump/status", b"online")
        publisher.set_status("pump", True)  # no change: nothing to say
        buffer.put([reading(1)])
        await eventually(lambda: broker.payloads(TOPIC) == [b"1"])
        assert len(broker.payloads(f"{PREFIX}/pump/status")) == 2


async def test_statuses_set_while_disconnected_go_out_on_connect_and_every_reconnect(
    broker: FakeBroker, buffer: DiskBuffer
) -> None:
    publisher = Publisher(settings(), buffer, subscriptions=[SET], on_message=lambda _: None)
    broker.refusing = UNREACHABLE
    async with running(publisher):
        await eventually(lambda: broker.connects >= 2, what="connects to be refused")
        publisher.set_status("pump", True)
        publisher.set_status("pump", False)  # only the latest is news
        publisher.set_status("meter", True)
        assert not broker.published
        broker.refusing = None
        await eventually(lambda: len(broker.published) == 3)
        first = broker.published[0].connection
        expected = [(STATUS, b"online"), (f"{PREFIX}/meter/status", b"online"),
                    (f"{PREFIX}/pump/status", b"offline")]
        assert summary(broker, first) == expected
        # Statuses are not history: after a lost connection they are all said again (the
        # broker may have lost them), with the gateway's `online` replacing the will's offline.
        assert broker.retained[STATUS] == b"online"
        broker.drop()
        await eventually(lambda: len(broker.on(first + 1)) == 3)
        assert summary(broker, first + 1) == expected
        assert broker.retained[STATUS] == b"online"


async def test_a_restarted_publisher_publishes_the_statuses_it_adopted(
    broker: FakeBroker, buffer: DiskBuffer
) -> None:
    old = Publisher(settings(), buffer)
    old.set_status("meter", True)
    new = Publisher(settings(), buffer)  # a reload changed the mqtt settings
    new.adopt_statuses(old)
    async with running(new):
        await eventually(lambda: len(broker.published) == 2)
    assert summary(broker, 1)[:2] == [(STATUS, b"online"), (f"{PREFIX}/meter/status", b"online")]


# ------------------------------------------------------------------ custody of readings


async def test_a_batch_leaves_the_buffer_only_once_delivered(
    broker: FakeBroker, buffer: DiskBuffer
) -> None:
    publisher = Publisher(settings(), buffer)
    async with running(publisher):
        await connected(publisher)
        broker.hold()  # the broker does not acknowledge yet
        buffer.put([reading(n) for n in range(5)])
        await eventually(lambda: buffer.in_flight == 5, what="the batch to be handed over")
        assert len(buffer) == 5  # in flight, still stored: a crash now loses nothing
        assert broker.payloads(TOPIC) == []
        broker.release()
        await eventually(lambda: len(buffer) == 0, what="the batch to be acknowledged")
        assert broker.payloads(TOPIC) == [b"%d" % n for n in range(5)]
        assert publisher.published == 5


async def test_a_poll_bigger_than_the_sessions_batch_is_handed_over_in_batches(
    broker: FakeBroker, buffer: DiskBuffer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A row is taken whole, but a session never gets more than its batch at once."""
    sizes: list[int] = []
    receive = broker.receive

    async def counted(session: Any, messages: list[Any]) -> None:
        sizes.append(len(messages))
        await receive(session, messages)

    monkeypatch.setattr(broker, "receive", counted)
    publisher = Publisher(settings(), buffer)
    async with running(publisher):
        await connected(publisher)
        buffer.put([reading(n) for n in range(25)])
        await eventually(lambda: len(buffer) == 0, what="the poll to be delivered")
    assert [n for n in sizes if n > 1] == [BATCH, BATCH, 5]  # statuses go one by one
    assert broker.payloads(TOPIC) == [b"%d" % n for n in range(25)]


async def test_a_failed_batch_is_requeued_and_delivered_in_order_after_a_reconnect(
    broker: FakeBroker, buffer: DiskBuffer
) -> None:
    publisher = Publisher(settings(), buffer)
    async with running(publisher):
        await connected(publisher)
        broker.hold()
        for poll in range(5):  # rows of 5: three batches (10, 10, 5)
            buffer.put([reading(5 * poll + n) for n in range(5)])
        await eventually(lambda: buffer.in_flight > 0)
        broker.drop()  # the connection is lost before the broker acknowledged anything
        await eventually(lambda: broker.connects == 2, what="a reconnect")
        assert len(buffer) == 25  # requeued, not lost
        broker.release()
        # A batch the broker refuses (a BrokerError) goes back too and costs a reconnect.
        broker.failures.append(WireError("broker refused a message: quota exceeded (151)",
                                         reason_code=151))
        await eventually(lambda: len(buffer) == 0, what="everything to be delivered")
    assert broker.connects == 3
    assert broker.payloads(TOPIC) == [b"%d" % n for n in range(25)]  # each once, in order
    assert publisher.reconnects == 2


async def test_a_timeout_in_a_publish_is_a_reconnect_not_a_goodbye(
    broker: FakeBroker, buffer: DiskBuffer
) -> None:
    """A publish that times out while running (not the stop's flush limit) costs a
    reconnect: the gateway is never said `offline` (the will is for that), the reading is
    delivered on the next connection."""
    publisher = Publisher(settings(), buffer)
    async with running(publisher):
        await connected(publisher)
        broker.failures.append(TimeoutError("no PUBACK in time"))
        buffer.put([reading(1)])
        await eventually(lambda: len(buffer) == 0, what="the reading to be delivered")
        assert broker.connects == 2
        assert broker.payloads(STATUS) == [b"online", b"online"]
    assert broker.payloads(TOPIC) == [b"1"]


async def test_the_backlog_left_at_stop_stays_on_disk_for_the_next_run(
    broker: FakeBroker, tmp_path: Path
) -> None:
    path = tmp_path / "buffer.sqlite3"
    buffer = DiskBuffer(path, max_messages=1000, max_bytes=10**8, max_age=86400)
    buffer.put([reading(n, age_ms=60_000) for n in range(30)])  # stored while the broker was away
    publisher = Publisher(settings(), buffer)
    publisher.stop()  # stopped as it connects: there is no time to replay
    await asyncio.wait_for(publisher.run(), 10)
    assert broker.payloads(TOPIC) == []
    assert summary(broker, 1) == [(STATUS, b"online"), (STATUS, b"offline")]
    buffer.close()

    buffer = DiskBuffer(path, max_messages=1000, max_bytes=10**8, max_age=86400)  # a restart
    assert len(buffer) == 30
    publisher = Publisher(settings(), buffer)
    async with running(publisher):
        await eventually(lambda: len(buffer) == 0, what="the backlog to be replayed")
    assert broker.payloads(TOPIC, connection=2) == [b"%d" % n for n in range(30)]
    buffer.close()


async def test_the_backlog_is_replayed_at_its_pace_behind_live_readings(
    broker: FakeBroker, buffer: DiskBuffer
) -> None:
    rate, backlog, poll = 200, 60, 5
    for first in range(0, backlog, poll):  # stored while the broker was away, poll by poll
        buffer.put([reading(n, retain=True, age_ms=60_000) for n in range(first, first + poll)])
    publisher = Publisher(settings(replay_rate=rate), buffer)
    async with running(publisher):
        await connected(publisher)
        buffer.put([reading(999, retain=True)])  # taken now: live
        await eventually(lambda: len(buffer) == 0, what="the backlog to be replayed")
    delivered = [p for p in broker.published if p.topic == TOPIC]
    live = next(i for i, p in enumerate(delivered) if p.payload == b"999")
    replayed = [p for p in delivered if p.payload != b"999"]
    assert [p.payload for p in replayed] == [b"%d" % n for n in range(backlog)]  # oldest first
    assert live < len(delivered) - 1  # the live reading did not wait for the backlog
    # Replayed readings are not retained: the retained value stays the newest reading.
    assert not any(p.retain for p in replayed)
    assert delivered[live].retain
    assert broker.retained[TOPIC] == b"999"
    # At most one batch (the burst) at once, then `rate` a second.
    start = replayed[0].at
    for k, message in enumerate(replayed):
        assert message.at - start >= (k // BATCH) * BATCH / rate - 0.005, k
    assert replayed[-1].at - start >= (backlog - BATCH) / rate - 0.005


async def test_rows_bigger_than_a_batch_replay_whole_and_keep_the_average_rate(
    broker: FakeBroker, buffer: DiskBuffer
) -> None:
    """A poll is taken whole even when it holds more than the replay allows at once: the pause
    after it pays the tokens back, so the backlog still averages `replay_rate` messages/s."""
    rate, poll, polls = 100, 3 * BATCH, 3
    for p in range(polls):
        buffer.put([reading(poll * p + n, age_ms=60_000) for n in range(poll)])
    publisher = Publisher(settings(replay_rate=rate), buffer)
    async with running(publisher):
        await eventually(lambda: len(buffer) == 0, what="the backlog to be replayed")
    replayed = [p for p in broker.published if p.topic == TOPIC]
    assert [p.payload for p in replayed] == [b"%d" % n for n in range(poll * polls)]
    starts = [replayed[k].at for k in range(0, poll * polls, poll)]
    # Each row at once (in the session's batches), with no pause for tokens inside it.
    assert all(replayed[k].at - starts[k // poll] < 0.1 for k in range(poll * polls))
    # A burst of BATCH, then `rate` a second: the last row waits for what the first two took.
    assert starts[-1] - starts[0] >= (2 * poll - BATCH) / rate - 0.005


async def test_a_backlog_in_the_old_one_row_per_message_file_is_delivered_in_order(
    broker: FakeBroker, tmp_path: Path
) -> None:
    """A gateway upgraded with a backlog in a format 1 buffer (one row per message) delivers
    every reading of it, in order, with its ts, then the new ones."""
    path = tmp_path / "buffer.sqlite3"
    old = [reading(n, age_ms=60_000 - n) for n in range(250)]
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT"
               " NULL, payload BLOB NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL,"
               " ts INTEGER NOT NULL)")
    db.executemany("INSERT INTO messages (topic, payload, qos, retain, ts) VALUES (?, ?, ?, ?, ?)",
                   [(m.topic, m.payload, m.qos, int(m.retain), m.ts) for m in old])
    db.close()
    buffer = DiskBuffer(path, max_messages=1000, max_bytes=10**8, max_age=86400)
    publisher = Publisher(settings(replay_rate=10_000), buffer)
    async with running(publisher):
        await connected(publisher)
        buffer.put([reading(1000)])
        await eventually(lambda: len(buffer) == 0, what="the old backlog to be replayed")
    delivered = [p.payload for p in broker.published if p.topic == TOPIC]
    assert [p for p in delivered if p != b"1000"] == [m.payload for m in old]
    assert b"1000" in delivered
    buffer.close()


# ------------------------------------------------------------------ reconnects


async def test_a_live_reading_does_not_wait_out_the_backlogs_pause(
    broker: FakeBroker, buffer: DiskBuffer
) -> None:
    # One a second: after the first batch (the burst) the replay pauses for BATCH seconds. A
    # reading taken meanwhile goes out at once (well within half the pause), not after it.
    for poll in range(3):
        buffer.put([reading(BATCH * poll + n, age_ms=60_000) for n in range(BATCH)])
    publisher = Publisher(settings(replay_rate=1), buffer)
    async with running(publisher):
        await eventually(lambda: len(broker.payloads(TOPIC)) >= BATCH,
                         what="the backlog's first batch")
        buffer.put([reading(999)])
        await eventually(lambda: b"999" in broker.payloads(TOPIC), timeout=BATCH / 2,
                         what="the live reading")
        assert len(broker.payloads(TOPIC)) == BATCH + 1  # the backlog still pauses


async def test_reconnect_back_off_doubles_to_its_cap_and_resets_after_a_connect(
    monkeypatch: pytest.MonkeyPatch, buffer: DiskBuffer
) -> None:
    broker = FakeBroker(batch=BATCH).install(monkeypatch)  # the real back-off constants
    publisher = Publisher(settings(), buffer, subscriptions=[SET], on_message=lambda _: None)
    waits: list[float] = []

    async def waited(delay: float) -> None:  # what the publisher would sleep, recorded
        waits.append(delay)
        await asyncio.sleep(0)

    monkeypatch.setattr(publisher.wake, "back_off", waited)
    broker.refusals.extend([UNREACHABLE] * 7)
    async with running(publisher):
        await connected(publisher)
        assert broker.connects == 8
        steps = [2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]  # 2 s doubling, capped at 60 s
        assert len(waits) == len(steps)
        for step, wait in zip(steps, waits, strict=True):
            assert step / 2 <= wait <= step  # jittered: 50-100% of the step
        broker.refusals.extend([UNREACHABLE] * 2)
        broker.drop()
        await eventually(lambda: broker.connects == 11 and publisher.connected.is_set())
        for step, wait in zip([2.0, 4.0, 8.0], waits[7:], strict=True):  # from the start again
            assert step / 2 <= wait <= step
    assert publisher.reconnects == 10


async def test_status_changes_during_an_outage_do_not_cut_the_back_off_short(
    monkeypatch: pytest.MonkeyPatch, buffer: DiskBuffer
) -> None:
    """Twenty devices going offline while the broker is away are not twenty connect
    attempts: the back-off waits its time (then their statuses go out on the connect)."""
    # A first back-off of 0.25-0.5 s: the twenty changes below take well under a millisecond.
    monkeypatch.setattr(bridge.mqtt.connection, "RECONNECT_BASE", 0.25)
    broker = FakeBroker(batch=BATCH).install(monkeypatch)
    broker.refusing = UNREACHABLE
    publisher = Publisher(settings(), buffer, subscriptions=[SET], on_message=lambda _: None)
    async with running(publisher):
        await eventually(lambda: broker.connects == 1, what="the first attempt")
        for n in range(20):
            publisher.set_status(f"d{n}", False)
            await asyncio.sleep(0)
        assert broker.connects == 1
        broker.refusing = None
        await eventually(publisher.connected.is_set, what="the connect after the back-off")
        assert broker.connects == 2
        def statuses() -> int:
            return len([p for p in broker.on(2) if p.topic.endswith("/status")])

        await eventually(lambda: statuses() == 21, what="gateway and 20 device statuses")


async def test_auto_falls_back_to_3_1_1_at_once_and_says_so_once(
    broker: FakeBroker, buffer: DiskBuffer
) -> None:
    """`protocol: auto` against a broker that speaks 3.1.1 only (NATS, RabbitMQ 3.x)."""
    publisher = Publisher(settings(), buffer, subscriptions=[SET], on_message=lambda _: None)
    broker.refusals.append(VERSION_REFUSED)
    with structlog.testing.capture_logs() as logs:
        async with running(publisher):
            await connected(publisher)
            broker.drop()
            await eventually(lambda: broker.connects == 3 and publisher.connected.is_set())
    assert broker.versions == [5, "3.1.1", "3.1.1"]  # remembered across reconnects
    assert publisher.reconnects == 1  # the fallback itself is no reconnect with back-off
    fell_back = [e for e in logs if "does not speak MQTT 5" in e["event"]]
    assert [(e["log_level"], e["event"]) for e in fell_back] == [
        ("info", "broker does not speak MQTT 5: using MQTT 3.1.1 (mqtt.protocol: auto)")]
    assert [e["protocol"] for e in logs if e["event"] == "broker connected"] == ["3.1.1"] * 2


async def test_a_pinned_5_refused_is_one_error_naming_the_setting_and_retries(
    monkeypatch: pytest.MonkeyPatch, broker: FakeBroker, buffer: DiskBuffer
) -> None:
    publisher = Publisher(settings(protocol=5), buffer, subscriptions=[SET],
                          on_message=lambda _: None)
    broker.refusals.extend([VERSION_REFUSED] * 4)
    buffer.put([reading(1)])
    with structlog.testing.capture_logs() as logs:
        async with running(publisher):
            await connected(publisher)  # the broker was upgraded meanwhile
            await eventually(lambda: summary(broker, 5)[-1:] == [(TOPIC, b"1")])
    assert broker.versions == [5] * 5
    said = [(e["log_level"], e["event"], e["error"]) for e in logs if "MQTT 5" in e["event"]]
    assert said == [("error", "broker does not speak MQTT 5",
                     f"{VERSION_REFUSED}; mqtt.protocol is 5: set it to auto (or 3.1.1) "
                     "for this broker")]
    assert publisher.reconnects == 4


async def test_broker_trouble_is_logged_once_per_change_of_cause(
    broker: FakeBroker, buffer: DiskBuffer
) -> None:
    publisher = Publisher(settings(), buffer, subscriptions=[SET], on_message=lambda _: None)
    broker.refusals.extend([UNREACHABLE] * 3 + [LOGIN_REFUSED] * 2)
    with structlog.testing.capture_logs() as logs:
        async with running(publisher):
            await connected(publisher)
            broker.drop()
            await eventually(lambda: broker.connects == 7 and publisher.connected.is_set())
    said = [(e["log_level"], e["event"], e.get("error")) for e in logs
            if e["event"] != "broker connected"]
    assert said == [
        ("warning", "broker unreachable", str(UNREACHABLE)),
        ("warning", "broker refused login",
         f"{LOGIN_REFUSED} (check mqtt.username and the password it is given)"),
        ("warning", "broker unreachable", "connection to the broker lost: Connection reset"),
    ]
    assert [e["event"] for e in logs].count("broker connected") == 2


async def test_a_bug_in_a_publish_costs_a_reconnect_not_the_publisher(
    broker: FakeBroker, buffer: DiskBuffer
) -> None:
    publisher = Publisher(settings(), buffer)
    with structlog.testing.capture_logs() as logs:
        async with running(publisher) as task:
            await connected(publisher)
            broker.failures.append(RuntimeError("a bug"))
            buffer.put([reading(1)])
            await eventually(lambda: broker.payloads(TOPIC) == [b"1"])
            assert not task.done()
            assert broker.connects == 2
            assert len(buffer) == 0  # the batch went back and out again
    assert "abort" in broker.events  # the bug dropped the connection, not the daemon
    [bug] = [e for e in logs if e["event"] == "publisher failed unexpectedly"]
    assert bug["log_level"] == "error"
    assert bug["exc_info"]


# ------------------------------------------------------------------ stopping


async def held_at_stop(
    broker: FakeBroker, buffer: DiskBuffer, readings: int
) -> tuple[Publisher, asyncio.Task[None]]:
    """A running publisher, connected, device `meter` online, `readings` readings buffered
    and their first batch in flight, held by the broker."""
    publisher = Publisher(settings(), buffer)
    publisher.set_status("meter", True)
    task = asyncio.create_task(publisher.run())
    await connected(publisher)
    broker.hold()
    buffer.put([reading(n) for n in range(readings)])
    await eventually(lambda: buffer.in_flight > 0)
    return publisher, task


async def test_stop_delivers_what_is_live_then_says_offline_and_disconnects(
    broker: FakeBroker, buffer: DiskBuffer
) -> None:
    publisher, task = await held_at_stop(broker, buffer, 25)
    publisher.stop(offline=["meter"])  # as the service does
    broker.release()
    await asyncio.wait_for(task, 10)
    assert len(buffer) == 0
    assert broker.payloads(TOPIC) == [b"%d" % n for n in range(25)]
    assert broker.payloads(f"{PREFIX}/meter/status") == [b"online", b"offline"]
    # The device's `offline` is the last word about it: after every reading (the 25 took
    # three batches), before the gateway's.
    order = [(p.topic, p.payload) for p in broker.published]
    assert order[-27:-2] == [(TOPIC, b"%d" % n) for n in range(25)]
    assert order[-2] == (f"{PREFIX}/meter/status", b"offline")
    assert (broker.published[-1].topic, broker.published[-1].payload) == (STATUS, b"offline")
    assert broker.published[-1].retain
    assert broker.events[-1] == "disconnect"  # a clean goodbye: the will is not needed
    assert broker.retained[STATUS] == b"offline"
    assert not publisher.connected.is_set()  # m2m_mqtt_connected 0 after the stop


async def test_a_stops_flush_is_bounded_and_what_it_could_not_deliver_stays_on_disk(
    broker: FakeBroker, buffer: DiskBuffer
) -> None:
    """A broker that stops acknowledging does not hold the stop for ever: after `flush`
    seconds the batch in flight goes back to the buffer and the statuses still go out."""
    publisher, task = await held_at_stop(broker, buffer, 5)
    publisher.stop(offline=["meter"], flush=0.2)
    await eventually(lambda: buffer.in_flight == 0, what="the flush to give up")
    broker.release()  # the broker answers again: the statuses are not lost with the batch
    await asyncio.wait_for(task, 10)
    assert len(buffer) == 5  # kept for the next run
    assert broker.payloads(TOPIC) == []
    assert broker.payloads(f"{PREFIX}/meter/status") == [b"online", b"offline"]
    assert broker.retained[STATUS] == b"offline"
    assert broker.events[-1] == "disconnect"


async def test_stop_while_the_broker_is_away_ends_without_waiting_for_it(
    broker: FakeBroker, buffer: DiskBuffer
) -> None:
    broker.refusing = UNREACHABLE
    buffer.put([reading(1)])
    publisher = Publisher(settings(), buffer)
    task = asyncio.create_task(publisher.run())
    await eventually(lambda: broker.connects >= 2)
    publisher.stop(offline=["meter"])
    await asyncio.wait_for(task, 10)
    assert len(buffer) == 1  # kept for the next run
    assert publisher.statuses.current == {"meter": False}  # what the metrics say after


# ------------------------------------------------------------------ commands


async def test_incoming_commands_reach_the_current_handler(
    broker: FakeBroker, buffer: DiskBuffer
) -> None:
    received: list[Incoming] = []
    publisher = Publisher(settings(), buffer, subscriptions=[SET], on_message=received.append)
    async with running(publisher):
        await connected(publisher)
        command = Incoming(f"{PREFIX}/valve/open/set", b"true", "reply/here", b"c-1")
        broker.send(command)
        await eventually(lambda: received == [command])
        swapped: list[Incoming] = []
        publisher.on_message = swapped.append  # a reload swaps the command handler
        second = Incoming(f"{PREFIX}/valve/open/set", b"false", None, None)
        broker.send(second)
        await eventually(lambda: swapped == [second])
        assert received == [command]
    assert broker.subscriptions == [(1, (SET,))]  # our own topics only


async def test_a_reply_goes_out_only_while_connected(
    broker: FakeBroker, buffer: DiskBuffer
) -> None:
    publisher = Publisher(settings(), buffer, subscriptions=[SET], on_message=lambda _: None)
    result = f"{PREFIX}/valve/open/set/result"
    assert await publisher.respond(result, b'{"ok": true}') is False  # never connected
    async with running(publisher):
        await connected(publisher)
        assert await publisher.respond(result, b'{"ok": true}', b"c-1") is True
        reply = broker.published[-1]
        assert (reply.topic, reply.payload, reply.qos, reply.retain, reply.correlation_data) == (
            result, b'{"ok": true}', 1, False, b"c-1")
        broker.failures.append(WireError("broker refused a message: not authorized (135)"))
        assert await publisher.respond(result, b'{"ok": false}') is False  # it did not go out
        broker.refusing = UNREACHABLE
        broker.drop()
        await eventually(lambda: not publisher.connected.is_set())
        assert await publisher.respond(result, b'{"ok": true}') is False
    assert broker.payloads(result) == [b'{"ok": true}']  # replies are never buffered


# ------------------------------------------------------------------ counters


async def test_metrics_count_delivered_readings_their_latency_and_reconnects(
    broker: FakeBroker, buffer: DiskBuffer
) -> None:
    publisher = Publisher(settings(), buffer, subscriptions=[SET], on_message=lambda _: None)
    publisher.set_status("meter", True)
    async with running(publisher):
        await connected(publisher)
        buffer.put([reading(1, age_ms=2000), reading(2, age_ms=2000)])
        await eventually(lambda: publisher.published == 2)
        assert publisher.latency_count == 2  # statuses are not readings: not counted
        assert publisher.latency_sum_ms >= 4000
        assert publisher.reconnects == 0
        broker.drop()
        await eventually(lambda: broker.connects == 2 and publisher.connected.is_set())
        assert publisher.reconnects == 1
