"""The edge node in the publisher's place: its statuses, its gateway status and its sessions.

The publisher (bridge.mqtt.publisher) speaks JSON status topics and plain sessions; with
`format: sparkplug` it is given these instead, each a thin adapter over the EdgeNode
(bridge.mqtt.sparkplug) that decides what goes out:
- `SparkplugStatuses`: device status as DBIRTH/DDEATH; the connect step is the births;
- `NodeGateway`: no `online` topic (NBIRTH is a connect step), NDEATH on a clean stop;
- `SeqSession`: the session buffered DDATA go through, numbered by the node as they are sent.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence

from bridge.core.messages import Message, Topics
from bridge.mqtt.session import Session
from bridge.mqtt.sparkplug import EdgeNode
from bridge.mqtt.statuses import DeviceStatuses
from bridge.mqtt.wireevents import Incoming


class SparkplugStatuses(DeviceStatuses):
    """Device statuses as Sparkplug says them: DBIRTH when online, DDEATH when offline; the
    connect step is the births, and changes also carry rebirths."""

    def __init__(self, node: EdgeNode, *, on_change: Callable[[], None]) -> None:
        super().__init__(Topics(""), on_change=on_change)
        self.node = node

    @property
    def leaving(self) -> bool:
        return self.node.leaving

    async def publish_all(self, session: Session) -> None:
        self._dirty = set()
        await self.node.births(session, self.current)

    async def publish_changes(self, session: Session) -> None:
        node = self.node
        if node.rebirth and node.node_born:
            self._dirty = set()
            await node.births(session, self.current)
            return
        if not self._dirty or not node.node_born:
            return  # the births tell every status
        dirty, self._dirty = self._dirty, set()
        for device in sorted(dirty):
            online = self._statuses[device]
            if online and device not in node.born:
                await node.device_birth(session, device)
            elif not online and device in node.born:
                message = node.ddeath(device)
                await session.publish(message.topic, message.payload, 0, False)


class NodeGateway:
    """In place of the gateway's status topic: nothing on connect (births are a connect step),
    NDEATH on a clean stop or when the primary host goes offline."""

    def __init__(self, node: EdgeNode) -> None:
        self.node = node
        self.topic = node.ndeath_topic

    async def online(self, session: Session) -> None:
        self.node.leaving = False

    async def offline(self, session: Session) -> None:
        await self.node.death(session)


class SeqSession:
    """A session whose batches are buffered DDATA: `EdgeNode.sequence` numbers them."""

    def __init__(self, session: Session, node: EdgeNode, statuses: DeviceStatuses) -> None:
        self.session = session
        self.node = node
        self.statuses = statuses
        self.batch = session.batch

    async def publish(
        self, topic: str, payload: bytes, qos: int, retain: bool,
        *, correlation_data: bytes | None = None,
    ) -> None:
        await self.session.publish(topic, payload, qos, retain,
                                   correlation_data=correlation_data)

    async def publish_batch(self, messages: Sequence[Message]) -> None:
        await self.session.publish_batch(self.node.sequence(messages, self.statuses.current))

    async def subscribe(self, topics: Sequence[str]) -> None:
        await self.session.subscribe(topics)

    def incoming(self) -> AsyncIterator[Incoming]:
        return self.session.incoming()
