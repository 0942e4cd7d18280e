"""Fake wires for unit tests of the MQTT side: no broker, no process, no socket.

Two layers, each faked just below the code under test:

- `FakeBroker` stands in for `bridge.mqtt.session.open_session`, so the publisher runs against
  it: `FakeBroker.install(monkeypatch)` swaps it in where the publisher connects. Every connect
  yields a `FakeSession` (the `bridge.mqtt.session.Session` interface). The broker records every
  publish (with the connection that carried it), can refuse connects and fail publishes (a
  `BrokerError`, or any exception: a bug), can hold batches unacknowledged, can drop the
  connection and can send commands in.
- `ByteBroker` is an asyncio transport that answers a real `WireClient`'s bytes as a broker
  would (CONNECT -> CONNACK, PUBLISH -> PUBACK, SUBSCRIBE -> SUBACK): the layer below a
  `Session`. `ByteBroker.install(monkeypatch)` makes the running loop's `create_connection`
  hand out these transports instead of sockets.

`eventually(predicate)` yields to the event loop until the predicate holds: no fixed sleeps,
only the waits the code itself makes.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import mqtt5
import pytest

import bridge.mqtt.connection
from bridge.config import MqttSettings
from bridge.core.messages import Message
from bridge.mqtt.publisher import Publisher
from bridge.mqtt.session import Version
from bridge.mqtt.wireevents import Incoming, WireError
from bridge.mqtt.wirelink import WireLink


async def eventually(
    predicate: Callable[[], bool], *, timeout: float = 10.0, what: str = "the condition"
) -> None:
    """Return once `predicate()` holds, yielding to the loop in between; AssertionError
    after `timeout` seconds (reached only when the test fails)."""
    deadline = time.monotonic() + timeout
    passes = 0
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout:g}s for {what}")
        passes += 1
        # Most conditions hold within a few loop iterations; past that the code is waiting on
        # a timer of its own (a back-off, the replay's pace): poll without spinning the CPU.
        await asyncio.sleep(0 if passes < 200 else 0.002)


# ------------------------------------------------------------------ the Session layer


@dataclass(frozen=True)
class Published:
    """One message as the fake broker received it."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    correlation_data: bytes | None
    connection: int  # which connect carried it, from 1
    at: float  # time.monotonic() when it was delivered


class FakeSession:
    """One connection to a FakeBroker: the `Session` interface."""

    def __init__(self, broker: FakeBroker, number: int) -> None:
        self.broker = broker
        self.number = number
        self.batch = broker.batch
        self.lost: BaseException | None = None  # why the connection dropped
        self.closed = False
        self._gone = asyncio.Event()  # lost or closed
        self._incoming: asyncio.Queue[Incoming | None] = asyncio.Queue()

    def _check(self) -> None:
        if self.lost is not None:
            raise self.lost
        if self.closed:
            raise WireError("not connected")

    async def publish(
        self, topic: str, payload: bytes, qos: int, retain: bool,
        *, correlation_data: bytes | None = None,
    ) -> None:
        await self.broker.receive(self, [(topic, payload, qos, retain, correlation_data)])

    async def publish_batch(self, messages: Sequence[Message]) -> None:
        await self.broker.receive(
            self, [(m.topic, m.payload, m.qos, m.retain, None) for m in messages]
        )

    async def subscribe(self, topics: Sequence[str]) -> None:
        self._check()
        self.broker.subscriptions.append((self.number, tuple(topics)))
        self.broker.events.append(f"subscribe {','.join(topics)}")

    async def incoming(self) -> AsyncIterator[Incoming]:
        while True:
            item = await self._incoming.get()
            if item is None:
                self._incoming.put_nowait(None)
                if self.lost is not None:
                    raise self.lost
                return
            yield item


class FakeBroker:
    """What the publisher's connections reached, and what the next ones will meet."""

    def __init__(self, *, batch: int = 500) -> None:
        self.batch = batch  # the sessions' batch size (the publisher takes this many at once)
        self.published: list[Published] = []
        self.events: list[str] = []  # connect, subscribe, publish, disconnect, abort, in order
        self.subscriptions: list[tuple[int, tuple[str, ...]]] = []
        self.retained: dict[str, bytes] = {}  # what a new subscriber would be given
        self.connects = 0  # attempts, refused ones included
        self.wills: list[str] = []
        self.versions: list[Version | None] = []  # the MQTT version each connect asked for
        self.settings: MqttSettings | None = None
        self.refusals: deque[BaseException] = deque()  # the next connects fail with these
        self.refusing: BaseException | None = None  # then every connect fails with this
        self.failures: deque[BaseException] = deque()  # the next publishes fail with these
        self.held: asyncio.Event | None = None  # while not None and not set, publishes wait
        self.session: FakeSession | None = None  # the live one

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FakeBroker:
        """Make the publisher connect here."""
        monkeypatch.setattr(bridge.mqtt.connection, "open_session", self.open_session)
        return self

    @asynccontextmanager
    async def open_session(self, settings: MqttSettings, will_topic: str, *,
                           version: Version | None = None) -> AsyncIterator[FakeSession]:
        self.connects += 1
        self.settings = settings
        self.versions.append(version)
        self.wills.append(will_topic)
        self.events.append("connect")
        await asyncio.sleep(0)  # a connect is never instant
        if self.refusals:
            raise copy.copy(self.refusals.popleft())
        if self.refusing is not None:
            raise copy.copy(self.refusing)  # a fresh one each time, as a real connect's
        session = FakeSession(self, self.connects)
        self.session = session
        try:
            yield session
        except BaseException:
            self._end(session, "abort")
            self.retained[will_topic] = b"offline"  # no DISCONNECT: the broker sends the will
            raise
        self._end(session, "disconnect")

    def _end(self, session: FakeSession, how: str) -> None:
        session.closed = True
        session._gone.set()
        session._incoming.put_nowait(None)
        if self.session is session:
            self.session = None
        self.events.append(how)

    async def receive(
        self, session: FakeSession,
        messages: list[tuple[str, bytes, int, bool, bytes | None]],
    ) -> None:
        """A publish or a batch: fail, wait while held, or deliver it."""
        session._check()
        if self.failures:
            raise self.failures.popleft()
        if self.held is not None and not self.held.is_set():
            released = asyncio.ensure_future(self.held.wait())
            gone = asyncio.ensure_future(session._gone.wait())
            try:
                await asyncio.wait({released, gone}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                released.cancel()
                gone.cancel()
            session._check()
        now = time.monotonic()
        for topic, payload, qos, retain, correlation in messages:
            self.published.append(
                Published(topic, payload, qos, retain, correlation, session.number, now)
            )
            self.events.append(f"publish {topic}")
            if retain:
                self.retained[topic] = payload

    def hold(self) -> None:
        """Publishes wait (unacknowledged) until `release()` or the connection drops."""
        self.held = asyncio.Event()

    def release(self) -> None:
        if self.held is not None:
            self.held.set()
        self.held = None

    def drop(self, error: BaseException | None = None) -> None:
        """The live connection is lost: what is in flight and what comes next fails."""
        session = self.session
        assert session is not None, "no connection to drop"
        session.lost = error or WireError("connection to the broker lost: Connection reset")
        self.events.append("dropped")
        session._gone.set()
        session._incoming.put_nowait(None)
        self.session = None

    def send(self, message: Incoming) -> None:
        """A message on one of our subscriptions (a command) arrives."""
        assert self.session is not None, "not connected"
        self.session._incoming.put_nowait(message)

    def payloads(self, topic: str, connection: int | None = None) -> list[bytes]:
        return [p.payload for p in self.published
                if p.topic == topic and (connection is None or p.connection == connection)]

    def on(self, connection: int) -> list[Published]:
        """What the `connection`th connect carried."""
        return [p for p in self.published if p.connection == connection]


# ------------------------------------------------------------------ the wire layer


class ByteBroker(asyncio.Transport):
    """A transport that answers a WireClient as a broker would, from the bytes it writes.

    CONNECT gets `connack`; a QoS 1 PUBLISH gets a PUBACK (with `puback_codes[topic]` when set)
    unless `holding`; SUBSCRIBE gets a SUBACK (`suback_codes[topic]`, else QoS 1 granted).
    `send(packet)` delivers a packet from the broker; `drop()` breaks the connection.
    """

    def __init__(self, protocol: WireLink, *, connack: mqtt5.ConnAckPacket | bytes,
                 puback_codes: dict[str, mqtt5.PubAckReasonCode],
                 suback_codes: dict[str, mqtt5.SubAckReasonCode]) -> None:
        super().__init__()
        self.protocol = protocol
        self.connack = connack
        self.puback_codes = puback_codes
        self.suback_codes = suback_codes
        self.holding = False
        self.held: list[int] = []  # packet ids of PUBLISHes not acknowledged (holding)
        self.packets: list[mqtt5.Packet] = []  # everything the client sent, parsed
        self._data = bytearray()
        self.closing = False

    @classmethod
    def install(
        cls,
        monkeypatch: pytest.MonkeyPatch,
        *,
        connack: mqtt5.ConnAckPacket | bytes | None = None,
        puback_codes: dict[str, mqtt5.PubAckReasonCode] | None = None,
        suback_codes: dict[str, mqtt5.SubAckReasonCode] | None = None,
        refuse: OSError | None = None,
    ) -> list[ByteBroker]:
        """Make the running loop's `create_connection` connect to a ByteBroker (or fail with
        `refuse`, as a socket would); the list fills with the transports handed out."""
        made: list[ByteBroker] = []
        loop = asyncio.get_running_loop()

        async def create_connection(
            factory: Callable[[], asyncio.BaseProtocol], *_args: Any, **_kwargs: Any
        ) -> tuple[asyncio.Transport, asyncio.BaseProtocol]:
            if refuse is not None:
                raise refuse
            protocol = factory()
            assert isinstance(protocol, WireLink)
            transport = cls(
                protocol, connack=connack or mqtt5.ConnAckPacket(),
                puback_codes=puback_codes or {}, suback_codes=suback_codes or {},
            )
            made.append(transport)
            protocol.connection_made(transport)
            return transport, protocol

        monkeypatch.setattr(loop, "create_connection", create_connection)
        return made

    # asyncio.Transport

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closing, "written after close"
        self._data += data
        view = memoryview(bytes(self._data))
        offset = 0
        while offset < len(view):
            try:
                packet, size = mqtt5.read(view[offset:])
            except IndexError:  # not all of it yet
                break
            offset += size
            self.packets.append(packet)
            self._answer(packet)
        del self._data[:offset]

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self._lose(None)

    def abort(self) -> None:
        self._lose(None)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    # the broker's side

    def _answer(self, packet: mqtt5.Packet) -> None:
        if isinstance(packet, mqtt5.ConnectPacket):
            self.send(self.connack)
        elif isinstance(packet, mqtt5.PublishPacket) and packet.packet_id is not None:
            if self.holding:
                self.held.append(packet.packet_id)
            else:
                self.ack(packet.packet_id, packet.topic)
        elif isinstance(packet, mqtt5.SubscribePacket):
            granted = mqtt5.SubAckReasonCode.GRANTED_QOS_AT_LEAST_ONCE
            codes = [self.suback_codes.get(f.pattern, granted) for f in packet.topic_filters]
            self.send(mqtt5.SubAckPacket(packet.packet_id, codes))

    def ack(self, packet_id: int, topic: str = "") -> None:
        code = self.puback_codes.get(topic, mqtt5.PubAckReasonCode.SUCCESS)
        self.send(mqtt5.PubAckPacket(packet_id, reason_code=code))

    def release(self) -> None:
        """Acknowledge every held PUBLISH."""
        self.holding = False
        for packet_id in self.held:
            self.ack(packet_id)
        self.held.clear()

    def send(self, packet: Any) -> None:
        """A packet from the broker (or its bytes), delivered on the next loop iteration."""
        data = packet if isinstance(packet, bytes) else bytes(packet.write())
        asyncio.get_running_loop().call_soon(self._deliver, data)

    def _deliver(self, data: bytes) -> None:
        if not self.closing:
            self.protocol.data_received(data)

    def drop(self) -> None:
        """The connection breaks under the client (a reset)."""
        self._lose(ConnectionResetError(104, "Connection reset by peer"))

    def _lose(self, exc: Exception | None) -> None:
        if not self.closing:
            self.closing = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, exc)

    def sent(self, kind: type[Any]) -> list[Any]:
        """The packets of one kind the client sent."""
        return [p for p in self.packets if isinstance(p, kind)]


@contextlib.asynccontextmanager
async def running(publisher: Publisher) -> AsyncIterator[asyncio.Task[None]]:
    """The publisher's run() as a task; stopped (and, if it hangs, cancelled) on the way out."""
    task = asyncio.create_task(publisher.run())
    try:
        yield task
    finally:
        publisher.stop()
        done, _ = await asyncio.wait({task}, timeout=10)
        if not done:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
