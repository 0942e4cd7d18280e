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
from collections.abc import Callable, Sequence

import aiomqtt
import structlog
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.properties import Properties

from bridge.buffer import MemoryBuffer
from bridge.config import MqttSettings
from bridge.health import Activity
from bridge.messages import Topics

log = structlog.get_logger("bridge.mqtt")

BATCH = 500  # messages per gather: large enough to keep the pipe full, small enough to requeue
RECONNECT_BASE = 1.0
RECONNECT_CAP = 60.0
PUBLISH_TIMEOUT = 30.0  # aiomqtt's per-call timeout: a batch unacknowledged this long failed


def make_client(settings: MqttSettings, *, will: aiomqtt.Will | None = None) -> aiomqtt.Client:
    """An aiomqtt client for `settings` (also used by the CLI and the demo)."""
    tls: ssl.SSLContext | None = None
    if settings.tls is not None:
        tls = ssl.create_default_context(cafile=settings.tls.ca_file)  # verification always on
        if settings.tls.cert_file:
            tls.load_cert_chain(settings.tls.cert_file, settings.tls.key_file)
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


class Publisher:
    """Publishes buffered messages and status topics; survives broker outages."""

    def __init__(
        self,
        settings: MqttSettings,
        buffer: MemoryBuffer,
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
            except aiomqtt.MqttError as exc:
                self._client = None
                self.last_error = repr(exc)
                self.connected.clear()
                if not was_down or attempt == 0:
                    log.warning("broker unreachable", host=self.settings.host, error=str(exc))
                was_down = True
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
        while True:
            if self._dirty:
                await self._publish_statuses(client)
            if not len(self.buffer):
                if self._stopping:
                    return
                await self._wait_for_work()
                continue
            batch = self.buffer.take(BATCH)
            try:
                with self.activity.running():
                    await asyncio.gather(
                        *(client.publish(m.topic, m.payload, m.qos, m.retain) for m in batch)
                    )
            except BaseException:
                self.buffer.requeue(batch)
                raise
            self.published += len(batch)

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
