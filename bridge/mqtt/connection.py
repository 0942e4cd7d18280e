"""One broker connection at a time: keeping it up, and the traffic of its own it carries.

`Reconnector` connects, serves the connection, and when it fails backs off and tries again
(bridge.core.backoff: 2 s doubling, jittered, capped at 60 s), logged once per change of state
or of cause, not once per attempt. A bug (any exception but a broker or OS error) is logged
with its traceback and costs a reconnect, never the daemon: readings stay buffered. After
`stop()` a failed connection is not retried. The connection itself is a
`bridge.mqtt.session.Session` (MQTT 5 or 3.1.1).

`Dispatch` is what the connection carries for `/set`: the bridge subscribes to its own topics
only (`<prefix>/+/+/set`, never wider), hands every incoming message to `on_message`
(bridge.mqtt.commands.CommandHandler.on_message, swapped on a reload), and publishes a
command's reply at once while a broker is connected. Replies are not buffered: they answer a
live request, which a reconnect (a clean session) loses anyway.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import structlog

from bridge.core.backoff import backoff
from bridge.errors import BrokerError
from bridge.mqtt.delivery import Counters, Wake
from bridge.mqtt.session import (
    Session,
    Version,
    Will,
    describe_connect_failure,
    first_version,
    open_session,
)
from bridge.mqtt.wire import Incoming
from bridge.mqtt.wireevents import VersionRefused

if TYPE_CHECKING:
    from bridge.config import MqttSettings

log = structlog.get_logger("bridge.mqtt.connection")

RECONNECT_BASE = 1.0  # the first retry waits 2 * this, jittered
RECONNECT_CAP = 60.0


class Reconnector:
    """The connect-serve-retry loop around one `serve(session)` per connection."""

    def __init__(
        self,
        settings: MqttSettings,
        will: str | Callable[[], Will],
        wake: Wake,
        counters: Counters,
    ) -> None:
        self.settings = settings
        # A topic (a retained `offline` there is the session's last will), or what makes the
        # will, asked once per connect attempt (Sparkplug's NDEATH carries a new bdSeq each).
        self.will = will
        self.wake = wake  # cuts a back-off short; `stopping` ends the loop
        self.counters = counters
        self.version: Version = first_version(settings)

    async def run(
        self, serve: Callable[[Session], Awaitable[None]], *, on_down: Callable[[], None]
    ) -> None:
        """Connect and `serve(session)`; return once it returns after stop (returning before
        stop is a wish to reconnect: at once). When the connection cannot be made or fails,
        call `on_down()`, log, back off and retry."""
        attempt = 0
        was_down = False
        last_event = ""
        settings = self.settings
        while True:
            try:
                will = self.will if isinstance(self.will, str) else self.will()
                async with open_session(settings, will, version=self.version) as session:
                    attempt = 0
                    log.info("broker connected", host=settings.host, port=settings.port,
                             protocol=str(self.version))
                    await serve(session)
                if self.wake.stopping:
                    return
                on_down()
                continue
            except VersionRefused as exc:
                if self._fall_back():
                    continue  # at once: the broker is there, it just speaks 3.1.1
                self._failed(exc, on_down)
                event, reason = describe_connect_failure(exc)
                if not was_down or event != last_event:
                    log.error(event, host=settings.host, error=reason)  # a config fix, not a wait
                was_down, last_event = True, event
                if self.wake.stopping:
                    return
            except Exception as exc:
                self._failed(exc, on_down)
                event, reason = describe_connect_failure(exc)
                # One line per change of state or cause, not one per attempt.
                if not was_down or attempt == 0 or event != last_event:
                    log.warning(event, host=settings.host, error=reason)
                was_down = True
                last_event = event
                if self.wake.stopping:
                    return  # nothing more can be delivered; the buffer keeps what is left
            attempt += 1
            self.counters.reconnects += 1
            delay = backoff(attempt, first=2 * RECONNECT_BASE, cap=RECONNECT_CAP)
            await self.wake.back_off(delay)

    @staticmethod
    def _failed(exc: Exception, on_down: Callable[[], None]) -> None:
        if not isinstance(exc, BrokerError | OSError):
            # A bug must cost a reconnect, never the daemon: readings stay buffered.
            log.exception("publisher failed unexpectedly")
        on_down()

    def _fall_back(self) -> bool:
        """`protocol: auto` and MQTT 5 refused: use 3.1.1 from now on (until a restart or a
        reload of the mqtt settings), said once. False when the setting pins 5."""
        if self.settings.protocol != "auto" or self.version != 5:
            return False
        self.version = "3.1.1"
        log.info("broker does not speak MQTT 5: using MQTT 3.1.1 (mqtt.protocol: auto)",
                 host=self.settings.host)
        return True


class Dispatch:
    """Subscriptions, incoming messages to `on_message`, and replies on the live session."""

    def __init__(
        self,
        subscriptions: Sequence[str] = (),
        on_message: Callable[[Incoming], None] | None = None,
    ) -> None:
        self.subscriptions = tuple(subscriptions)
        self.on_message = on_message
        self._session: Session | None = None  # where replies go; None while disconnected

    async def subscribe(self, session: Session) -> None:
        """Subscribe to our topics on `session`; replies go through it from then on."""
        await session.subscribe(self.subscriptions)
        self._session = session

    def detach(self) -> None:
        """The session is gone: replies fail until the next `subscribe`."""
        self._session = None

    async def receive(self, session: Session) -> None:
        """Hand every incoming message to `on_message` (looked up per message) until the
        session ends; return at once when there is no `on_message`."""
        if self.on_message is None:
            return
        async for message in session.incoming():
            self.on_message(message)

    async def respond(
        self, topic: str, payload: bytes, correlation_data: bytes | None = None
    ) -> bool:
        """Publish a reply now (QoS 1, not retained, not buffered: it answers a live request).

        Returns False when no broker is connected; the reply is then lost, as its request would
        be with a clean session.
        """
        return await self.send(topic, payload, 1, False, correlation_data=correlation_data)

    async def send(
        self, topic: str, payload: bytes, qos: int, retain: bool,
        *, correlation_data: bytes | None = None,
    ) -> bool:
        """Publish on the live session, not through the buffer; False when there is none or
        the publish failed."""
        session = self._session
        if session is None:
            return False
        try:
            await session.publish(topic, payload, qos, retain, correlation_data=correlation_data)
        except BrokerError:
            return False
        return True
