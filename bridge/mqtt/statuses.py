"""Status topics: the gateway's and every device's, retained, never buffered.

`<prefix>/status` is `online` while the bridge is connected: the last will (set by
`bridge.mqtt.session.open_session` on this topic) and a clean stop make it `offline`.
`<prefix>/<device>/status` is each device's `online`/`offline`. Statuses describe now, not
history, so they are never buffered: one set while no broker is connected waits here, the
latest value only, and on every connect every device's status goes out again (a broker may
have lost them, a reload may have changed them).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

from bridge.core.messages import Topics
from bridge.mqtt.session import Session

ONLINE = b"online"
OFFLINE = b"offline"  # also the will's payload (bridge.mqtt.session.open_session)


class GatewayStatus:
    """`<prefix>/status`: `online` on connect, `offline` on a clean stop and as the will."""

    def __init__(self, topics: Topics) -> None:
        self.topic = topics.gateway_status  # the will's topic

    async def online(self, session: Session) -> None:
        await session.publish(self.topic, ONLINE, 1, True)

    async def offline(self, session: Session) -> None:
        await session.publish(self.topic, OFFLINE, 1, True)


class DeviceStatuses:
    """Every device's latest status and which of them the broker has not been told yet.

    `on_change()` is called when a status changes, so a waiting publisher sends it now.
    """

    def __init__(self, topics: Topics, *, on_change: Callable[[], None]) -> None:
        self.topics = topics
        self._on_change = on_change
        self._statuses: dict[str, bool] = {}
        self._dirty: set[str] = set()  # changed since last published (or never published)

    def set(self, device: str, online: bool) -> None:
        """Record a device's status; it goes out now if connected, else on the next connect."""
        if self._statuses.get(device) is not online:
            self._statuses[device] = online
            self._dirty.add(device)
            self._on_change()

    def adopt(self, other: DeviceStatuses) -> None:
        """Take over `other`'s statuses (a publisher restarted on reload): all to publish."""
        self._statuses = dict(other._statuses)
        self._dirty = set(self._statuses)

    @property
    def current(self) -> Mapping[str, bool]:
        """Every device's latest status (a read-only view)."""
        return MappingProxyType(self._statuses)

    @property
    def leaving(self) -> bool:
        """Whether the connection should end now (and be made again): never, here."""
        return False

    @property
    def pending(self) -> bool:
        """Whether a status waits to be published."""
        return bool(self._dirty)

    async def publish_all(self, session: Session) -> None:
        """Every device's status (retained, QoS 1), in name order: the connect-time step."""
        self._dirty = set(self._statuses)
        await self.publish_changes(session)

    async def publish_changes(self, session: Session) -> None:
        """The statuses not yet published, in name order. Those not sent when the session
        fails stay pending."""
        if not self._dirty:
            return
        dirty, self._dirty = self._dirty, set()
        try:
            for device in sorted(dirty):
                payload = ONLINE if self._statuses[device] else OFFLINE
                await session.publish(self.topics.device_status(device), payload, 1, True)
        except BaseException:
            self._dirty |= dirty
            raise
