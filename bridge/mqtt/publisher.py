"""MQTT publisher: drains the buffer to the broker, owns the status topics and subscriptions.

Connection: a last will sets `<prefix>/status` to `offline` (retained); on every connect the
bridge publishes `online`, then every device's current status, because retained statuses are
"now", not history, and are never buffered. Reconnects back off (bridge.core.backoff: 2 s
doubling, jittered, capped at 60 s), and are logged once per change.
The connection itself is a `bridge.mqtt.session.Session` (MQTT 5 or 3.1.1).

Delivery: batches are taken from the buffer and published concurrently, so many QoS 1 messages
are in flight at once; a batch is only dropped from the buffer's custody once every message in
it was handed over (QoS 0) or acknowledged (QoS 1). A failed batch goes back to the front.
Readings the buffer could not store (a full disk) are taken from it directly and go first.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

import structlog

from bridge.buffer import DiskBuffer, Stored
from bridge.config import MqttSettings
from bridge.core.backoff import backoff
from bridge.core.messages import Message, Topics
from bridge.errors import BrokerError
from bridge.health import Activity
from bridge.mqtt.session import PUBLISH_TIMEOUT, Session, describe_connect_failure, open_session
from bridge.mqtt.wire import Incoming

log = structlog.get_logger("bridge.mqtt.publisher")

RECONNECT_BASE = 1.0
RECONNECT_CAP = 60.0
DELETE_RETRY = 1.0  # seconds between retries of failed buffer deletes while the backlog waits


class Publisher:
    """Publishes buffered messages and status topics; survives broker outages."""

    def __init__(
        self,
        settings: MqttSettings,
        buffer: DiskBuffer,
        *,
        subscriptions: Sequence[str] = (),
        on_message: Callable[[Incoming], None] | None = None,
    ) -> None:
        self.settings = settings
        self.buffer = buffer
        self.subscriptions = tuple(subscriptions)
        self.on_message = on_message
        self._session: Session | None = None
        self.topics = Topics(settings.topic_prefix)
        self._statuses: dict[str, bool] = {}
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self._stopping = False
        self.connected = asyncio.Event()
        self.activity = Activity("publisher", 2 * PUBLISH_TIMEOUT)
        self.published = 0
        self.reconnects = 0
        # Acquisition to delivery, per message: a Prometheus summary's sum and count.
        self.latency_count = 0
        self.latency_sum_ms = 0

    def set_status(self, device: str, online: bool) -> None:
        """Record a device's status; it goes out now if connected, else on the next connect."""
        if self._statuses.get(device) is not online:
            self._statuses[device] = online
            self._dirty.add(device)
            self._wake.set()

    def adopt_statuses(self, other: Publisher) -> None:
        """Take over `other`'s device statuses (on reload): they are published on connect."""
        self._statuses = dict(other._statuses)
        self._dirty = set(self._statuses)

    async def run(self) -> None:
        """Connect, publish, reconnect on failure; return after `stop()` once drained."""
        attempt = 0
        was_down = False
        last_event = ""
        status = self.topics.gateway_status
        while True:
            try:
                async with open_session(self.settings, status) as session:
                    attempt = 0
                    log.info("broker connected", host=self.settings.host, port=self.settings.port,
                             protocol=str(self.settings.protocol))
                    await session.publish(status, b"online", 1, True)
                    self._dirty = set(self._statuses)
                    await self._serve(session)
                    await session.publish(status, b"offline", 1, True)
                    return
            except Exception as exc:
                if not isinstance(exc, BrokerError | OSError):
                    # A bug must cost a reconnect, never the daemon: readings stay buffered.
                    log.exception("publisher failed unexpectedly")
                self._session = None
                event, reason = describe_connect_failure(exc)
                self.connected.clear()
                # One line per change of state or of cause, not one per attempt.
                if not was_down or attempt == 0 or event != last_event:
                    log.warning(event, host=self.settings.host, error=reason)
                was_down = True
                last_event = event
                if self._stopping:
                    return  # nothing more can be delivered; the buffer keeps what is left
            attempt += 1
            self.reconnects += 1
            delay = backoff(attempt, first=2 * RECONNECT_BASE, cap=RECONNECT_CAP)
            await self._sleep_unless_stopping(delay)

    async def respond(
        self, topic: str, payload: bytes, correlation_data: bytes | None = None
    ) -> bool:
        """Publish a reply now (QoS 1, not retained, not buffered: it answers a live request).

        Returns False when no broker is connected; the reply is then lost, as its request would
        be with a clean session.
        """
        session = self._session
        if session is None:
            return False
        try:
            await session.publish(topic, payload, 1, False, correlation_data=correlation_data)
        except BrokerError:
            return False
        return True

    async def _serve(self, session: Session) -> None:
        """One connection's life: subscribe to our own topics only, receive, publish."""
        await session.subscribe(self.subscriptions)
        self._session = session
        self.connected.set()
        self.buffer.direct_to = self  # what the buffer cannot store now comes to us
        try:
            async with asyncio.TaskGroup() as tg:
                receiving = tg.create_task(self._receive(session))
                await self._pump(session)
                receiving.cancel()
        except BaseExceptionGroup as group:
            # The connection dropped under the receiver or the pump: the caller handles one
            # error (reconnect), not a group of them.
            raise _first_error(group) from None
        finally:
            self._session = None
            if self.buffer.direct_to is self:
                self.buffer.direct_to = None

    async def _receive(self, session: Session) -> None:
        if self.on_message is None:
            return
        async for message in session.incoming():
            self.on_message(message)

    def stop(self) -> None:
        """Finish: deliver what is buffered, publish `offline`, disconnect."""
        self._stopping = True
        self._wake.set()

    async def _sleep_unless_stopping(self, delay: float) -> None:
        self._wake.clear()
        if not self._stopping:
            # asyncio.timeout, not wait_for: on 3.11 wait_for drops a cancel that lands as the
            # event is set (gh-86296), and a stop would then wait on this loop for ever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()

    async def _pump(self, session: Session) -> None:
        """Deliver live readings first; replay the backlog at a bounded rate beside them.

        Rows stored before this connection are the backlog: replayed oldest first (so in order
        per point, with their original ts) at `buffer.replay_rate` messages a second, so a day
        of readings does not flood the broker; readings taken from now on go out at once.
        On stop, live readings are flushed and the backlog stays on disk for the next run.
        Readings the buffer could not store go before anything else. While deletes fail (a
        full disk) the backlog waits: replaying it would only make what a restart sends again.
        """
        backlog_end = self.buffer.last_id()
        batch_size = session.batch
        replay = TokenBucket(self.settings.buffer.replay_rate, burst=batch_size)
        while True:
            if self._dirty:
                await self._publish_statuses(session)
            direct = self.buffer.take_direct(batch_size)
            if direct:
                await self._deliver_direct(session, direct)
                continue
            batch = self.buffer.take(batch_size, after=backlog_end)
            pause: float | None = None
            if not batch and backlog_end and not self._stopping and self.buffer.deletes_pending:
                self.buffer.ack(())  # retry them
                if self.buffer.deletes_pending:
                    pause = DELETE_RETRY
            if pause is None and not batch and backlog_end and not self._stopping:
                allowed = replay.available()
                if allowed >= min(batch_size, 16):  # replay in batches, not a trickle of ones
                    batch = self.buffer.take(allowed, upto=backlog_end)
                    if not batch:
                        backlog_end = 0  # replayed: everything is live now
                        continue
                else:
                    pause = replay.wait_time(batch_size)
            if not batch:
                if self._stopping:
                    return
                if pause is None:
                    await self._wait_for_work()
                else:  # the backlog waits for tokens; a status change or stop cuts it short
                    await self._sleep_unless_stopping(pause)
                continue
            replaying = bool(backlog_end) and batch[0].id <= backlog_end
            if replaying:
                replay.spend(len(batch))
            await self._deliver(session, batch, replaying=replaying)

    async def _deliver(self, session: Session, batch: list[Stored], *, replaying: bool) -> None:
        messages = [s.message for s in batch]
        if replaying:
            # Live readings went out first: a replayed one must not become the retained value.
            messages = [replace(m, retain=False) if m.retain else m for m in messages]
        try:
            with self.activity.running():
                await session.publish_batch(messages)
        except BaseException:
            self.buffer.requeue([s.id for s in batch])
            raise
        self.buffer.ack([s.id for s in batch])
        self._delivered(messages)

    async def _deliver_direct(self, session: Session, messages: list[Message]) -> None:
        try:
            with self.activity.running():
                await session.publish_batch(messages)
        except BaseException:
            self.buffer.requeue_direct(messages)
            raise
        self._delivered(messages)

    def _delivered(self, messages: Sequence[Message]) -> None:
        self.published += len(messages)
        now_ms = time.time_ns() // 1_000_000
        self.latency_count += len(messages)
        self.latency_sum_ms += sum(now_ms - m.ts for m in messages)

    async def _publish_statuses(self, session: Session) -> None:
        dirty, self._dirty = self._dirty, set()
        try:
            for device in sorted(dirty):
                payload = b"online" if self._statuses[device] else b"offline"
                await session.publish(self.topics.device_status(device), payload, 1, True)
        except BaseException:
            self._dirty |= dirty
            raise

    async def _wait_for_work(self) -> None:
        self._wake.clear()
        waiters = {
            asyncio.ensure_future(self.buffer.wait()),
            asyncio.ensure_future(self._wake.wait()),
        }
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first leaf of a (nested) exception group, MQTT errors first."""
    leaves: list[BaseException] = []
    stack: list[BaseException] = [group]
    while stack:
        exc = stack.pop(0)
        if isinstance(exc, BaseExceptionGroup):
            stack[:0] = list(exc.exceptions)
        else:
            leaves.append(exc)
    mqtt = [e for e in leaves if isinstance(e, BrokerError)]
    return (mqtt or leaves)[0]


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
