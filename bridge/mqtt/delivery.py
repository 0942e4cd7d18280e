"""Delivery: the buffer's readings to the broker, live ones at once, the backlog paced.

Batches are taken from the buffer and published concurrently, so many QoS 1 messages are in
flight at once; a batch is only dropped from the buffer's custody (acked) once every message in
it was handed over (QoS 0) or acknowledged (QoS 1). A failed batch goes back to the front
(requeued). Readings the buffer could not store (a full disk) are taken from it directly and go
first.

`Delivery` is that custody, `Drain` one connection's pass over the buffer (what is live, what
is backlog, when to wait), `TokenBucket` the backlog's pace, `Wake` what cuts the publisher's
waits short and `Counters` what was delivered, how late, and how often the broker was lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import operator
import time
from collections.abc import Callable, Sequence

from bridge.buffer import DiskBuffer, Stored
from bridge.core.messages import Message
from bridge.health import Activity
from bridge.mqtt.session import Session

_TS = operator.attrgetter("ts")
DELETE_RETRY = 1.0  # seconds between retries of failed buffer deletes while the backlog waits
REPLAY_MIN_BATCH = 16  # replay in batches of at least this many (or a session's batch), not ones


class Wake:
    """What cuts the publisher's waits short: new work, a status change, `stop()`."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._stopped = asyncio.Event()
        self.stopping = False

    def set(self) -> None:
        """Something changed: a waiting publisher looks again."""
        self._event.set()

    def stop(self) -> None:
        self.stopping = True
        self._stopped.set()
        self._event.set()

    async def back_off(self, delay: float) -> None:
        """Wait `delay` seconds or until `stop()`: unlike `sleep`, new work or a status change
        does not cut it short (a burst of them would be a burst of connect attempts)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._stopped.wait()

    async def sleep(self, delay: float) -> None:
        """Wait `delay` seconds, or until `set()` or `stop()`; not at all once stopping."""
        self._event.clear()
        if not self.stopping:
            # asyncio.timeout, not wait_for: on 3.11 wait_for drops a cancel that lands as the
            # event is set (gh-86296), and a stop would then wait on this loop for ever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._event.wait()

    async def until(self, ready: Callable[[], bool]) -> None:
        """Wait until `set()` or `stop()`, unless `ready()` already: whatever makes it true
        must call `set()` (the buffer does, through its `on_ready`)."""
        self._event.clear()
        if not self.stopping and not ready():
            await self._event.wait()


class Counters:
    """The publisher's figures for the metrics: messages delivered, acquisition-to-delivery
    latency (a Prometheus summary's count and sum) and broker reconnect attempts."""

    __slots__ = ("latency_count", "latency_sum_ms", "published", "reconnects")

    def __init__(self) -> None:
        self.published = 0
        self.reconnects = 0
        self.latency_count = 0
        self.latency_sum_ms = 0

    def delivered(self, messages: Sequence[Message]) -> None:
        self.published += len(messages)
        now_ms = time.time_ns() // 1_000_000
        self.latency_count += len(messages)
        self.latency_sum_ms += now_ms * len(messages) - sum(map(_TS, messages))


class Delivery:
    """The buffer's custody of a batch: handed to a session, then acked, or requeued."""

    def __init__(self, buffer: DiskBuffer, counters: Counters, activity: Activity) -> None:
        self.buffer = buffer
        self.counters = counters
        self.activity = activity
        # What replayed (backlog) messages become on the wire, if not themselves (Sparkplug
        # marks them historical: bridge.mqtt.sparkplug).
        self.historical: Callable[[list[Message]], list[Message]] | None = None

    async def stored(self, session: Session, batch: list[Stored], *, replaying: bool) -> None:
        """Publish buffered rows; ack them once delivered, requeue them if not (and raise)."""
        messages = [m for row in batch for m in row.messages]
        if replaying:
            # Live readings went out first: a replayed one must not become the retained value.
            messages = [m._replace(retain=False) if m.retain else m for m in messages]
            if self.historical is not None:
                messages = self.historical(messages)
        try:
            with self.activity.running():
                # A row (a poll) may hold more than the session's batch: handed over in
                # batches still, so no more than `session.batch` wait on the session at once.
                for start in range(0, len(messages), session.batch):
                    await session.publish_batch(messages[start : start + session.batch])
        except BaseException:
            self.buffer.requeue([s.id for s in batch])
            raise
        self.buffer.ack([s.id for s in batch])
        self.counters.delivered(messages)

    async def direct(self, session: Session, messages: list[Message]) -> None:
        """Publish readings the buffer could not store; back to it if not delivered."""
        try:
            with self.activity.running():
                await session.publish_batch(messages)
        except BaseException:
            self.buffer.requeue_direct(messages)
            raise
        self.counters.delivered(messages)


class Drain:
    """One connection's pass over the buffer: live readings first; the backlog replayed at a
    bounded rate beside them.

    Rows stored before this connection are the backlog: replayed oldest first (so in order
    per point, with their original ts) at `replay_rate` messages a second, so a day of
    readings does not flood the broker; readings taken from now on go out at once. On stop,
    live readings are flushed and the backlog stays on disk for the next run. Readings the
    buffer could not store go before anything else. While deletes fail (a full disk) the
    backlog waits: replaying it would only make what a restart sends again.
    """

    def __init__(
        self, session: Session, delivery: Delivery, wake: Wake, *, replay_rate: float
    ) -> None:
        self.session = session
        self.delivery = delivery
        self.buffer = delivery.buffer
        self.wake = wake
        self.backlog_end = self.buffer.last_id()  # 0: no backlog (left)
        self.batch_size = session.batch
        self.replay = TokenBucket(replay_rate, burst=self.batch_size)
        # A reading stored (or requeued) wakes the pass: whether it waits for one or for the
        # backlog's pace, a live reading goes out at once.
        self.buffer.on_ready = wake.set

    async def step(self) -> bool:
        """Deliver the next batch, or wait for one (or for the backlog's pace); False once
        stopping with nothing live left to deliver."""
        buffer, batch_size, backlog_end = self.buffer, self.batch_size, self.backlog_end
        stopping = self.wake.stopping
        direct = buffer.take_direct(batch_size)
        if direct:
            await self.delivery.direct(self.session, direct)
            return True
        batch = buffer.take(batch_size, after=backlog_end)
        pause: float | None = None
        if not batch and backlog_end and not stopping and buffer.deletes_pending:
            buffer.ack(())  # retry them
            if buffer.deletes_pending:
                pause = DELETE_RETRY
        if pause is None and not batch and backlog_end and not stopping:
            allowed = self.replay.available()
            if allowed >= min(batch_size, REPLAY_MIN_BATCH):
                batch = buffer.take(allowed, upto=backlog_end)
                if not batch:
                    self.backlog_end = 0  # replayed: everything is live now
                    return True
            else:
                pause = self.replay.wait_time(batch_size)
        if not batch:
            if stopping:
                return False
            if pause is None:
                await self.wake.until(buffer.available)
            else:  # the backlog waits for tokens; a status change or stop cuts it short
                await self.wake.sleep(pause)
            return True
        replaying = bool(backlog_end) and batch[0].id <= backlog_end
        if replaying:
            # Tokens count messages; a row is taken whole, so a big one may overdraw the
            # bucket: the pause after it pays that back, and the average stays `replay_rate`.
            self.replay.spend(sum(len(row.messages) for row in batch))
        await self.delivery.stored(self.session, batch, replaying=replaying)
        return True


class TokenBucket:
    """At most `rate` a second on average, `burst` at once: the backlog replay's pace."""

    def __init__(self, rate: float, *, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._at = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now

    def available(self) -> int:
        self._refill()
        return int(self._tokens)

    def spend(self, n: int) -> None:
        self._tokens -= n

    def wait_time(self, n: int = 1) -> float:
        """Seconds until `n` tokens are available."""
        self._refill()
        return max(0.0, (min(n, self.burst) - self._tokens) / self.rate)
