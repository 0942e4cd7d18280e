"""MQTT publisher: drains the buffer to the broker, owns the status topics and subscriptions.

`Publisher` coordinates small parts, one job each:

- `bridge.mqtt.connection.Reconnector`: connect, and after a failure back off and retry, logged
  once per change;
- `bridge.mqtt.statuses`: the gateway's `online`/`offline` (and last will) and every device's
  status, retained and never buffered;
- `bridge.mqtt.connection.Dispatch`: our subscriptions, incoming commands, immediate replies;
- `bridge.mqtt.delivery`: the buffer's custody (ack after delivery, requeue on failure), live
  readings first and the backlog paced (`Drain`), and the counters the metrics read.

One connection's life, in order (`_serve`): the gateway's `online`; our subscriptions; the
connect-time steps (`on_connect`: every device's status; whatever must reach the broker before
any reading goes here too, such as births or discovery documents); then readings and status
changes until `stop()`; then the gateway's `offline` and a clean disconnect.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import structlog

from bridge.buffer import DiskBuffer
from bridge.core.messages import Topics
from bridge.errors import BrokerError
from bridge.health import Activity
from bridge.mqtt.connection import Dispatch, Reconnector
from bridge.mqtt.delivery import Counters, Delivery, Drain, Wake
from bridge.mqtt.session import PUBLISH_TIMEOUT, Session
from bridge.mqtt.statuses import DeviceStatuses, GatewayStatus
from bridge.mqtt.wire import Incoming

if TYPE_CHECKING:
    from bridge.config import MqttSettings
    from bridge.mqtt.sparkplug import EdgeNode
    from bridge.mqtt.sparkplug_publish import NodeGateway

log = structlog.get_logger("bridge.mqtt.publisher")

# A connect-time step: publishes on a fresh session, before the backlog and any reading.
ConnectStep = Callable[[Session], Awaitable[None]]


class Publisher:
    """Publishes buffered messages and status topics; survives broker outages."""

    def __init__(
        self,
        settings: MqttSettings,
        buffer: DiskBuffer,
        *,
        subscriptions: Sequence[str] = (),
        on_message: Callable[[Incoming], None] | None = None,
        node: EdgeNode | None = None,
    ) -> None:
        """`node`: with `format: sparkplug`, the edge node that says what the gateway and
        device statuses say otherwise (births and deaths), and numbers the readings."""
        self.settings = settings
        self.buffer = buffer
        self.topics = Topics(settings.topic_prefix)
        self.connected = asyncio.Event()
        self.activity = Activity("publisher", 2 * PUBLISH_TIMEOUT)
        self.counters = Counters()
        self.wake = Wake()
        self.node = node
        self.gateway: GatewayStatus | NodeGateway = GatewayStatus(self.topics)
        self.statuses = DeviceStatuses(self.topics, on_change=self.wake.set)
        self.dispatch = Dispatch(subscriptions, on_message)
        self.delivery = Delivery(buffer, self.counters, self.activity)
        self.reconnector = Reconnector(settings, self.gateway.topic, self.wake, self.counters)
        if node is not None:
            # Imported only with a node (format: sparkplug): a JSON daemon holds no protobuf.
            from bridge.mqtt.sparkplug_publish import (  # noqa: PLC0415 - see above
                NodeGateway,
                SparkplugStatuses,
            )

            node.attach(self.wake)
            self.gateway = NodeGateway(node)
            self.statuses = SparkplugStatuses(node, on_change=self.wake.set)
            self.delivery.historical = node.historical
            self.reconnector.will = node.will
        # On every connect, after the subscriptions and before any reading, in this order.
        self.on_connect: list[ConnectStep] = [self.statuses.publish_all]
        self._leaving: tuple[str, ...] = ()  # devices to say `offline` for once stopped
        self._flush_by: float | None = None  # loop time the stop's flush ends by
        self._flush_timer: asyncio.Timeout | None = None  # the live connection's flush limit

    # --- the surface the service, the daemon and the metrics use ---------------------------

    @property
    def subscriptions(self) -> tuple[str, ...]:
        return self.dispatch.subscriptions

    @property
    def on_message(self) -> Callable[[Incoming], None] | None:
        return self.dispatch.on_message

    @on_message.setter
    def on_message(self, handler: Callable[[Incoming], None] | None) -> None:
        self.dispatch.on_message = handler  # applies to the next message received

    @property
    def published(self) -> int:
        return self.counters.published

    @property
    def reconnects(self) -> int:
        return self.counters.reconnects

    @property
    def latency_count(self) -> int:
        """Messages delivered whose acquisition-to-delivery time is in `latency_sum_ms`."""
        return self.counters.latency_count

    @property
    def latency_sum_ms(self) -> int:
        return self.counters.latency_sum_ms

    def set_status(self, device: str, online: bool) -> None:
        """Record a device's status; it goes out now if connected, else on the next connect."""
        self.statuses.set(device, online)

    def adopt_statuses(self, other: Publisher) -> None:
        """Take over `other`'s device statuses (on reload): they are published on connect."""
        self.statuses.adopt(other.statuses)

    async def respond(
        self, topic: str, payload: bytes, correlation_data: bytes | None = None
    ) -> bool:
        """Publish a reply now (QoS 1, not retained, not buffered); False when no broker is
        connected (see bridge.mqtt.connection.Dispatch.respond)."""
        return await self.dispatch.respond(topic, payload, correlation_data)

    async def send(self, topic: str, payload: bytes, qos: int, retain: bool) -> bool:
        """Publish now on the live session, not through the buffer (what describes now, like
        discovery documents); False when no broker is connected."""
        return await self.dispatch.send(topic, payload, qos, retain)

    async def run(self) -> None:
        """Connect, publish, reconnect on failure; return after `stop()` once drained."""
        try:
            await self.reconnector.run(self._serve, on_down=self._down)
        finally:
            self.connected.clear()  # m2m_mqtt_connected says 0 once the publisher has left
            self._leave()  # not connected at the stop: the statuses still say what is true

    def _leave(self) -> None:
        for device in self._leaving:
            self.statuses.set(device, False)

    def stop(self, *, offline: Sequence[str] = (), flush: float | None = None) -> None:
        """Finish: deliver what is live in the buffer (for at most `flush` seconds; the rest
        stays on disk for the next run), then say `offline` for the devices named in
        `offline` and for the gateway, and disconnect.

        Statuses after readings: a device's `offline` (Sparkplug: its DDEATH) is the last
        thing said about it, never followed by a reading taken before the stop."""
        self._leaving = tuple(offline)
        if flush is not None:
            self._flush_by = asyncio.get_running_loop().time() + flush
            if self._flush_timer is not None:
                self._flush_timer.reschedule(self._flush_by)
        self.wake.stop()

    # --- one connection -------------------------------------------------------------------

    async def _serve(self, session: Session) -> None:
        """One connection's life (see the module docstring); returns after `stop()`, or to
        be made again when the statuses say so (Sparkplug: the primary host went offline)."""
        if self.node is not None:
            from bridge.mqtt.sparkplug_publish import SeqSession  # noqa: PLC0415 - as in __init__

            session = SeqSession(session, self.node, self.statuses)
        await self.gateway.online(session)
        await self.dispatch.subscribe(session)  # our own topics only; replies may go now
        self.connected.set()
        self.buffer.direct_to = self  # what the buffer cannot store now comes to us
        try:
            async with asyncio.TaskGroup() as tg:
                receiving = tg.create_task(self.dispatch.receive(session))
                await self._pump(session)
                receiving.cancel()
        except BaseExceptionGroup as group:
            # The connection dropped under the receiver or the pump: the caller handles one
            # error (reconnect), not a group of them.
            raise _first_error(group) from None
        finally:
            self.dispatch.detach()
            self.buffer.end_live(self)  # held QoS 0 readings not yet delivered: to the disk
            if self.buffer.direct_to is self:
                self.buffer.direct_to = None
        await self.gateway.offline(session)

    async def _pump(self, session: Session) -> None:
        """The connect-time steps, then status changes and readings until stopped."""
        drain = Drain(session, self.delivery, self.wake,
                      replay_rate=self.settings.buffer.replay_rate)  # backlog: stored by now
        for step in self.on_connect:
            await step(session)
        if self.node is not None:
            # Sparkplug births may have waited for the primary host: what was read meanwhile
            # is history to it, replayed after the births (is_historical), not live.
            drain.backlog_end = self.buffer.last_id()
        # Live from here: QoS 0 readings are handed over in memory (bridge.buffer.held).
        self.buffer.go_live(self)
        # Stopping: what is live goes out first, for at most the stop's `flush` (a batch cut
        # off, even one in flight as the stop came, is requeued and kept), then the devices'
        # `offline`, so no reading follows a device's last word.
        timer = self._flush_timer = asyncio.timeout_at(self._flush_by)
        try:
            async with timer:
                while not self.wake.stopping:
                    await self.statuses.publish_changes(session)  # ahead of any reading
                    if self.statuses.leaving:
                        return
                    await drain.step()
                while await drain.step():
                    pass
        except TimeoutError:
            if not timer.expired():
                raise  # not the flush's limit: a failure like any other (a reconnect)
            log.warning("stop flush cut short", left_in_buffer=len(self.buffer))
        finally:
            self._flush_timer = None
        self._leave()
        await self.statuses.publish_changes(session)

    def _down(self) -> None:
        """The connection failed or could not be made."""
        self.dispatch.detach()
        self.connected.clear()


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
