"""Home Assistant discovery on the broker: when it is published, re-published and cleared.

The documents themselves are bridge.core.homeassistant's. They describe now, like statuses, so
they go out on the live session and never through the buffer (whose replay drops `retain`):
- on every connect, after the statuses and before any reading (a connect step);
- when Home Assistant announces `online` on `<ha prefix>/status` (it restarted and forgot);
- after a reload, with an empty retained document for each one the new config no longer has
  (a removed device, or every document when discovery is turned off or moves prefix), so Home
  Assistant removes them. Clears that could not be sent wait for the next connect.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import structlog

from bridge import __version__
from bridge.core.homeassistant import Discovery
from bridge.core.messages import Message
from bridge.mqtt.session import Session
from bridge.mqtt.wireevents import Incoming

if TYPE_CHECKING:
    from bridge.config import Config

log = structlog.get_logger("bridge.mqtt.discovery")

# Publish on the live session: (topic, payload, qos, retain) -> delivered?
Send = Callable[[str, bytes, int, bool], Awaitable[bool]]


class Announcer:
    """Keeps Home Assistant's view of the gateway's devices in step with the config."""

    def __init__(self, config: Config, send: Send) -> None:
        self.discovery = _discovery(config)
        self.send = send
        self._clears: set[str] = set()  # topics whose documents must be emptied
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def subscriptions(self) -> list[str]:
        return [self.discovery.status_topic] if self.discovery is not None else []

    async def on_connect(self, session: Session) -> None:
        """A connect step: pending clears, then every document, on the new session."""
        for message in self._messages():
            await session.publish(message.topic, message.payload, message.qos, message.retain)
        self._clears.clear()

    def on_message(self, message: Incoming) -> bool:
        """Whether `message` was Home Assistant's status (taken here, not a command)."""
        if self.discovery is None or message.topic != self.discovery.status_topic:
            return False
        # A retained `online` comes with every subscribe, right after on_connect published.
        if message.payload.strip() == b"online" and not message.retain:
            log.info("home assistant is online: publishing discovery again")
            self._soon()
        return True

    def update(self, config: Config) -> None:
        """A reload: clear what `config` no longer describes, publish what it does."""
        new = _discovery(config)
        self._clears |= _topics(self.discovery) - _topics(new)
        self._clears -= _topics(new)
        self.discovery = new
        if self._clears or new is not None:
            self._soon()

    def _messages(self) -> list[Message]:
        ts = time.time_ns() // 1_000_000
        found = [Message(topic, b"", 1, True, ts) for topic in sorted(self._clears)]
        if self.discovery is not None:
            found += self.discovery.messages(ts)
        return found

    def _soon(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # not running yet: the first connect publishes everything
        task = loop.create_task(self._publish(), name="discovery")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish(self) -> None:
        cleared = set(self._clears)
        for message in self._messages():
            if not await self.send(message.topic, message.payload, message.qos, message.retain):
                return  # not connected: the next connect publishes everything
        self._clears -= cleared


def _discovery(config: Config) -> Discovery | None:
    return Discovery(config, __version__) if config.mqtt.homeassistant is not None else None


def _topics(discovery: Discovery | None) -> set[str]:
    if discovery is None:
        return set()
    return {discovery.topic(None)} | {discovery.topic(d.name) for d in discovery.config.devices}
