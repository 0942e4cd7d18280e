"""MQTT publisher: drains the buffer to the broker over aiomqtt, owns the status topics.

Connection: a last will sets `<prefix>/status` to `offline` (retained); on every connect the
bridge publishes `online`, then every device's current status, because retained statuses are
"now", not history, and are never buffered. Reconnects back off with full jitter
(`uniform(0, base * 2**attempt)`, capped: aiomqtt's own rule), and are logged once per change.

Delivery: batches are taken from the buffer and published concurrently, so many QoS 1 messages
are in flight at once; a batch is only dropped from the buffer's custody once every message in
it was handed over (QoS 0) or acknowledged (QoS 1). A failed batch goes back to the front.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
import time
from collections.abc import Callable, Sequence

import aiomqtt
import structlog
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from bridge.buffer import DiskBuffer, Stored
from bridge.config import MqttSettings
from bridge.errors import BrokerError
from bridge.health import Activity
from bridge.messages import Topics

log = structlog.get_logger("bridge.mqtt")

# Messages in flight per gather: aiomqtt and paho scan their pending maps per message, so the
# cost per message grows with this (profiled: 500 cost twice what 64 does).
BATCH = 64
RECONNECT_BASE = 1.0
RECONNECT_CAP = 60.0
PUBLISH_TIMEOUT = 30.0  # aiomqtt's per-call timeout: a batch unacknowledged this long failed


def make_client(settings: MqttSettings, *, will: aiomqtt.Will | None = None) -> aiomqtt.Client:
    """An aiomqtt client for `settings` (also used by the CLI and the demo)."""
    tls = tls_context(settings) if settings.tls is not None else None
    v5 = settings.protocol == 5
    protocol = MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311
    password = settings.password.get_secret_value() if settings.password else None
    client = aiomqtt.Client(
        settings.host,
        settings.port,
        username=settings.username,
        password=password,
        identifier=settings.client_id,
        protocol=aiomqtt.ProtocolVersion(protocol.value),
        will=will,
        keepalive=max(1, round(settings.keepalive)),
        tls_context=tls,
        max_inflight_messages=BATCH,
        timeout=PUBLISH_TIMEOUT,
    )
    # aiomqtt warns past 10 pending publishes; we keep up to BATCH in flight on purpose.
    client.pending_calls_threshold = 2 * BATCH
    return client


def tls_context(settings: MqttSettings) -> ssl.SSLContext:
    """The TLS context for `settings.tls`: verification always on, client cert if given.

    Files are read at every connect, so renewed certificates are picked up. A file that cannot
    be loaded raises BrokerError naming the setting and the file (never a key's contents).
    """
    assert settings.tls is not None
    tls = settings.tls
    try:
        context = ssl.create_default_context(cafile=tls.ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise BrokerError(f"mqtt.tls.ca_file {tls.ca_file}: cannot load: {_reason(exc)}") from None
    if tls.cert_file:
        try:
            # A callback that gives no passphrase: never prompt on a terminal for one.
            context.load_cert_chain(tls.cert_file, tls.key_file, password=lambda: b"")
        except (OSError, ssl.SSLError) as exc:
            files = ", ".join(f for f in (tls.cert_file, tls.key_file) if f)
            raise BrokerError(
                f"mqtt.tls.cert_file/key_file {files}: cannot load: {_reason(exc)}"
            ) from None
    return context


def _reason(exc: OSError | ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    return exc.strerror or str(exc)


# CONNACK codes that mean "your credentials were refused": MQTT 3.1.1 return codes 4 and 5,
# MQTT 5 reason codes 0x86 (bad user name or password) and 0x87 (not authorized).
_LOGIN_REFUSED = frozenset({4, 5, 0x86, 0x87})


def describe_connect_failure(exc: BaseException) -> tuple[str, str]:
    """(log event, reason) for a failed broker connection, naming what an operator must fix.

    A wrong CA (or a broker certificate for another host) and a refused login are told apart
    from an unreachable broker: retrying will not fix them, a config change will.
    """
    seen: BaseException | None = exc
    for _ in range(5):  # the ssl error is aiomqtt's __context__ or __cause__
        if seen is None:
            break
        if isinstance(seen, ssl.SSLCertVerificationError):
            why = seen.verify_message or seen.reason or str(seen)
            return (
                "broker certificate verification failed",
                f"certificate verify failed: {why} (check mqtt.tls.ca_file and mqtt.host)",
            )
        if isinstance(seen, ssl.SSLError):
            return "broker TLS handshake failed", f"{seen.reason or seen}"
        seen = seen.__cause__ or seen.__context__
    if isinstance(exc, MqttConnectError):
        code = exc.rc.value if isinstance(exc.rc, ReasonCode) else exc.rc
        if code in _LOGIN_REFUSED:
            return (
                "broker refused login",
                f"{exc} (check mqtt.username and the password it is given)",
            )
        return "broker refused connection", str(exc)
    if isinstance(exc, BrokerError):
        return "broker settings unusable", str(exc)
    return "broker unreachable", str(exc)


class Publisher:
    """Publishes buffered messages and status topics; survives broker outages."""

    def __init__(
        self,
        settings: MqttSettings,
        buffer: DiskBuffer,
        *,
        subscriptions: Sequence[str] = (),
        on_message: Callable[[aiomqtt.Message], None] | None = None,
    ) -> None:
        self.settings = settings
        self.buffer = buffer
        self.subscriptions = tuple(subscriptions)
        self.on_message = on_message
        self._client: aiomqtt.Client | None = None
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
        self.last_error = ""

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
        will = aiomqtt.Will(self.topics.gateway_status, b"offline", qos=1, retain=True)
        while True:
            try:
                async with make_client(self.settings, will=will) as client:
                    attempt = 0
                    log.info("broker connected", host=self.settings.host, port=self.settings.port)
                    await client.publish(self.topics.gateway_status, b"online", qos=1, retain=True)
                    self._dirty = set(self._statuses)
                    await self._session(client)
                    await client.publish(self.topics.gateway_status, b"offline", qos=1, retain=True)
                    return
            except Exception as exc:
                if not isinstance(exc, aiomqtt.MqttError | BrokerError):
                    # A bug must cost a reconnect, never the daemon: readings stay buffered.
                    log.exception("publisher failed unexpectedly")
                self._client = None
                event, reason = describe_connect_failure(exc)
                self.last_error = f"{event}: {reason}"
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
            delay = random.uniform(0, min(RECONNECT_CAP, RECONNECT_BASE * 2**attempt))
            await self._sleep_unless_stopping(delay)

    async def respond(
        self, topic: str, payload: bytes, properties: Properties | None = None
    ) -> bool:
        """Publish a reply now (QoS 1, not retained, not buffered: it answers a live request).

        Returns False when no broker is connected; the reply is then lost, as its request would
        be with a clean session.
        """
        client = self._client
        if client is None:
            return False
        try:
            await client.publish(topic, payload, 1, False, properties)
        except aiomqtt.MqttError:
            return False
        return True

    async def _session(self, client: aiomqtt.Client) -> None:
        """One connection's life: subscribe to our own topics only, receive, publish."""
        for topic in self.subscriptions:
            await client.subscribe(topic, qos=1)
        self._client = client
        self.connected.set()
        try:
            async with asyncio.TaskGroup() as tg:
                receiving = tg.create_task(self._receive(client))
                await self._pump(client)
                receiving.cancel()
        except BaseExceptionGroup as group:
            # The connection dropped under the receiver or the pump: the caller handles one
            # MqttError (reconnect), not a group of them.
            raise _first_error(group) from None
        finally:
            self._client = None

    async def _receive(self, client: aiomqtt.Client) -> None:
        if self.on_message is None:
            return
        async for message in client.messages:
            self.on_message(message)

    def stop(self) -> None:
        """Finish: deliver what is buffered, publish `offline`, disconnect."""
        self._stopping = True
        self._wake.set()

    async def _sleep_unless_stopping(self, delay: float) -> None:
        self._wake.clear()
        if not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    async def _pump(self, client: aiomqtt.Client) -> None:
        """Deliver live readings first; replay the backlog at a bounded rate beside them.

        Rows stored before this connection are the backlog: replayed oldest first (so in order
        per point, with their original ts) at `buffer.replay_rate` messages a second, so a day
        of readings does not flood the broker; readings taken from now on go out at once.
        On stop, live readings are flushed and the backlog stays on disk for the next run.
        """
        backlog_end = self.buffer.last_id()
        replay = TokenBucket(self.settings.buffer.replay_rate, burst=BATCH)
        while True:
            if self._dirty:
                await self._publish_statuses(client)
            batch = self.buffer.take(BATCH, after=backlog_end)
            pause: float | None = None
            if not batch and backlog_end and not self._stopping:
                allowed = replay.available()
                if allowed >= min(BATCH, 16):  # replay in batches, not a trickle of ones
                    batch = self.buffer.take(allowed, upto=backlog_end)
                    if not batch:
                        backlog_end = 0  # replayed: everything is live now
                        continue
                else:
                    pause = replay.wait_time(BATCH)
            if not batch:
                if self._stopping:
                    return
                if pause is None:
                    await self._wait_for_work()
                else:  # the backlog waits for tokens; a status change or stop cuts it short
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), pause)
                continue
            replay.spend(len(batch) if backlog_end and batch[0].id <= backlog_end else 0)
            await self._deliver(client, batch)

    async def _deliver(self, client: aiomqtt.Client, batch: list[Stored]) -> None:
        try:
            with self.activity.running():
                await asyncio.gather(
                    *(
                        client.publish(s.message.topic, s.message.payload, s.message.qos,
                                       s.message.retain)
                        for s in batch
                    )
                )
        except BaseException:
            self.buffer.requeue([s.id for s in batch])
            raise
        self.buffer.ack([s.id for s in batch])
        self.published += len(batch)
        now_ms = time.time_ns() // 1_000_000
        self.latency_count += len(batch)
        self.latency_sum_ms += sum(now_ms - s.message.ts for s in batch)

    async def _publish_statuses(self, client: aiomqtt.Client) -> None:
        dirty, self._dirty = self._dirty, set()
        try:
            for device in sorted(dirty):
                payload = b"online" if self._statuses[device] else b"offline"
                await client.publish(self.topics.device_status(device), payload, 1, True)
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
    mqtt = [e for e in leaves if isinstance(e, aiomqtt.MqttError)]
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
