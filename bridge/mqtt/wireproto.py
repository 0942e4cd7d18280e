"""The MQTT 5 client's protocol state, sans I/O: bytes in, events and bytes out (h11's shape).

`WireState` is what `bridge.mqtt.wire.WireClient` (the asyncio shell) drives. It holds no
socket, no event loop, no clock: the shell feeds it received bytes (`receive`), sends what it
queued (`take_out`), and tells it the time where the keepalive needs one (`tick`).

- Outgoing: one buffer of encoded packets (the `mqtt5` Rust codec builds them); the shell
  hands it to the transport in one write per loop iteration.
- QoS 1 in flight: packet id -> the `Batch` it belongs to (None: sent by `publish`), capped
  by the broker's Receive Maximum (`window`, from CONNACK). A `Batch` is a countdown the shell
  subclasses: `settled()` is called when its last message is acknowledged.
- Incoming: frames are split (a packet may arrive in pieces, several in one chunk), decoded,
  and turned into events, plain data the shell acts on. Successful PUBACKs of batch messages,
  the hot path, settle their batch directly and make no event.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import mqtt5
from mqtt5 import (
    ConnAckPacket,
    ConnectPacket,
    DisconnectPacket,
    PingReqPacket,
    PingRespPacket,
    PubAckPacket,
    PublishPacket,
    QoS,
    SubAckPacket,
    SubscribePacket,
    TopicFilter,
    Will,
)

from bridge.mqtt.wireevents import (
    FAILURE,
    PING_RESP,
    Batch,
    Connected,
    Event,
    Failed,
    Incoming,
    PubAck,
    Refused,
    SubAck,
    VersionRefused,
    WindowFull,
    WireError,
    frame_size,
    refusal,
    suback_error,
)

__all__ = ["MAX_INCOMING", "Batch", "Outgoing", "WireState", "frame_size"]

# A message to publish: (topic, payload, qos, retain), and whatever follows, unread: a
# bridge.core.messages.Message (its `ts` last) goes as it is, with no tuple made per message.
Outgoing = tuple[str, bytes, int, bool, *tuple[int, ...]]

_QOS: Final = (QoS.AT_MOST_ONCE, QoS.AT_LEAST_ONCE)
_QOS1: Final = QoS.AT_LEAST_ONCE
_MAX_PACKET_ID: Final = 65535
V3_CONNACK_SIZE: Final = 4  # 0x20, remaining length 2, flags, return code
MAX_INCOMING: Final = 1 << 20  # bytes; announced in CONNECT, so the broker sends nothing larger


class WireState:
    """One MQTT 5 connection's state (clean start, QoS 0 and 1). No I/O, no clock."""

    def __init__(
        self,
        client_id: str,
        *,
        username: str | None = None,
        password: str | None = None,
        keepalive: int = 30,
        will: tuple[str, bytes, int, bool] | None = None,
        receive_maximum_hint: int = 1000,
    ) -> None:
        if will is not None and will[2] not in (0, 1):
            raise ValueError(f"will qos must be 0 or 1, not {will[2]}")
        self.client_id, self.keepalive = client_id, keepalive
        self._username, self._password, self._will = username, password, will
        self._receive_maximum_hint = max(1, min(receive_maximum_hint, _MAX_PACKET_ID))
        self.connected = False
        self.out = bytearray()  # encoded packets not yet handed to the transport
        self.inflight: dict[int, Batch | None] = {}
        self._subscribing: dict[int, Sequence[str]] = {}  # packet id -> its topics
        self.next_id = 1
        self.window = 65535  # the broker's Receive Maximum, set from CONNACK
        self.max_packet_size: int | None = None
        self.max_qos = 1
        self.retain_available = True
        # MQTT 5 topic aliases, first come and kept for the connection (replacing them would
        # resend names on every publish once there are more topics than aliases).
        self.topic_alias_max = 0
        self.aliases: dict[str, int] = {}
        self._inbuf = bytearray()
        self._connack_seen = False
        # Keepalive, in the shell's clock: it sets these when it writes and reads.
        self.last_sent = self.last_received = 0.0
        self.ping_deadline: float | None = None

    def take_out(self) -> bytearray:
        """What to write now; a new buffer is started (the transport may keep this one)."""
        data, self.out = self.out, bytearray()
        return data

    # ------------------------------------------------------------------ sending

    def connect(self) -> None:
        """Queue CONNECT (clean start; announces our Receive Maximum and packet size)."""
        will = None
        if self._will is not None:
            topic, payload, qos, retain = self._will
            will = Will(topic, payload=payload, qos=_QOS[qos], retain=retain)
        self.out += ConnectPacket(
            self.client_id,
            username=self._username,
            password=self._password.encode() if self._password is not None else None,
            clean_start=True,
            will=will,
            keep_alive=self.keepalive,
            receive_max=self._receive_maximum_hint,
            max_packet_size=MAX_INCOMING,
        ).write()

    def disconnect(self) -> None:
        """Queue DISCONNECT (normal: the broker drops the will)."""
        self.out += DisconnectPacket().write()

    def publish(
        self, topic: str, payload: bytes, qos: int, retain: bool, *,
        response_topic: str | None = None, correlation_data: bytes | None = None,
    ) -> int | None:
        """Queue one PUBLISH; its packet id for QoS 1 (its PUBACK comes as a PubAck event).
        WindowFull when the window is full."""
        if qos and len(self.inflight) >= self.window:
            raise WindowFull(f"{len(self.inflight)} QoS 1 messages in flight")
        self._check(qos, retain)
        packet_id = self._allocate() if qos else None
        name, alias = self._aliased(topic)
        data = PublishPacket(
            name, payload, qos=_QOS[qos], retain=retain, packet_id=packet_id,
            response_topic=response_topic, correlation_data=correlation_data, topic_alias=alias,
        ).write()
        self._check_size(data)
        if packet_id is not None:
            self.inflight[packet_id] = None
        self.out += data
        return packet_id

    def publish_many(self, messages: Sequence[Outgoing], start: int, batch: Batch) -> int:
        """Queue messages[start:] as PUBLISHes of `batch` until the window is full; the
        index of the first message not queued (len(messages): all of them)."""
        inflight, subscribing, window = self.inflight, self._subscribing, self.window
        out, max_size = self.out, self.max_packet_size
        aliases, aliased = self.aliases, self._aliased
        if start == 0 and (self.max_qos < 1 or not self.retain_available):
            for m in messages:  # a broker that limits these
                self._check(m[2], m[3])
        for index in range(start, len(messages)):
            m = messages[index]
            topic, payload, qos, retain = m[0], m[1], m[2], m[3]
            alias = aliases.get(topic)
            if alias is not None:
                topic = ""  # the broker knows it by its alias on this connection
            else:
                topic, alias = aliased(topic)
            if qos == 1:
                if len(inflight) >= window:
                    return index
                packet_id = self.next_id
                if packet_id in inflight or packet_id in subscribing:
                    packet_id = self._allocate()
                else:
                    self.next_id = packet_id % 65535 + 1
                data = PublishPacket(
                    topic, payload, qos=_QOS1, retain=retain, packet_id=packet_id,
                    topic_alias=alias,
                ).write()
                if max_size is not None and len(data) > max_size:
                    self._check_size(data)  # raises, before the id is taken
                inflight[packet_id] = batch
                batch.remaining += 1
            else:
                if qos:
                    self._check(qos, retain)  # raises: neither 0 nor 1
                data = PublishPacket(topic, payload, retain=retain, topic_alias=alias).write()
                if max_size is not None and len(data) > max_size:
                    self._check_size(data)
            out += data
        return len(messages)

    def _aliased(self, topic: str) -> tuple[str, int | None]:
        """(name, alias) for a PUBLISH of `topic`: "" and its alias once it has one; the name
        with a new alias while the broker allows more; else the name alone."""
        alias = self.aliases.get(topic)
        if alias is not None:
            return "", alias
        if len(self.aliases) < self.topic_alias_max:
            alias = self.aliases[topic] = len(self.aliases) + 1
            return topic, alias
        return topic, None

    def subscribe(self, topics: Sequence[str], qos: int) -> int:
        """Queue one SUBSCRIBE; its packet id (the SubAck event names it)."""
        packet_id = self._allocate()
        self._subscribing[packet_id] = topics
        self.out += SubscribePacket(
            packet_id, [TopicFilter(topic, max_qos=_QOS[qos]) for topic in topics]
        ).write()
        return packet_id

    def subscribed(self, packet_id: int) -> None:
        """The shell is done waiting for this SUBACK: its packet id is free again."""
        self._subscribing.pop(packet_id, None)

    def tick(self, now: float) -> float | WireError:
        """The keepalive at `now`: queues a PINGREQ after `keepalive` s idle; the delay until
        the next tick, or why the connection is dead (no PINGRESP `keepalive` s later)."""
        if self.ping_deadline is not None and now >= self.ping_deadline:
            return WireError(f"no PINGRESP from the broker within {self.keepalive}s")
        # Ping when nothing was sent, or nothing received, for `keepalive` s: the latter finds
        # a half-open connection while we keep sending QoS 0.
        due = min(self.last_sent, self.last_received) + self.keepalive
        if now >= due:
            self.out += PingReqPacket().write()
            if self.ping_deadline is None:
                self.ping_deadline = now + self.keepalive
            due = now + self.keepalive
        if self.ping_deadline is not None:
            due = min(due, self.ping_deadline)
        return due - now

    def drop_inflight(self) -> set[Batch]:
        """The connection is gone: forget every message in flight; the batches they were in."""
        batches = {batch for batch in self.inflight.values() if batch is not None}
        self.inflight.clear()
        self.connected = False
        return batches

    def _check(self, qos: int, retain: bool) -> None:
        if qos not in (0, 1):
            raise ValueError(f"qos must be 0 or 1, not {qos}")
        if qos > self.max_qos:
            raise WireError(f"the broker accepts at most QoS {self.max_qos}")
        if retain and not self.retain_available:
            raise WireError("the broker does not accept retained messages")

    def _check_size(self, data: bytes) -> None:
        if self.max_packet_size is not None and len(data) > self.max_packet_size:
            raise WireError(
                f"a message of {len(data)} bytes exceeds the broker's maximum packet size"
                f" of {self.max_packet_size}"
            )

    def _allocate(self) -> int:
        """The next packet id not in use (1..65535, wrapping)."""
        packet_id = self.next_id
        inflight, subscribing = self.inflight, self._subscribing
        while packet_id in inflight or packet_id in subscribing:
            packet_id = packet_id % _MAX_PACKET_ID + 1
        self.next_id = packet_id % _MAX_PACKET_ID + 1
        return packet_id

    # ------------------------------------------------------------------ receiving

    def receive(self, data: bytes) -> list[Event]:
        """Bytes from the broker: the events of the packets complete so far (a partial one is
        kept for the next chunk). Successful PUBACKs of batch messages settle their batch
        here and make no event. After a Failed event, nothing more of the chunk is read."""
        events: list[Event] = []
        inbuf = self._inbuf
        buf: bytes | bytearray
        if inbuf:
            inbuf += data
            buf = inbuf
        else:
            buf = data
        end = len(buf)
        off = 0
        read = mqtt5.read
        inflight = self.inflight
        if not self._connack_seen and end >= V3_CONNACK_SIZE and buf[1] == 2 and buf[0] == 0x20:
            # An MQTT 5 CONNACK always has properties, so its remaining length is at least 3;
            # 2 is a 3.1.1 CONNACK, which mqtt5 would misread. Its answer to a v5 CONNECT is
            # return code 1 (unacceptable protocol version), or a bug if it says anything else.
            self._connack_seen = True
            return [Refused(VersionRefused(
                "the broker does not speak MQTT 5 (it answered with an MQTT 3.1.1 CONNACK, "
                f"return code {buf[3]})"
            ))]
        with memoryview(buf) as view:
            while off < end:
                try:
                    packet, size = read(view[off:])
                except IndexError:  # mqtt5: "Not enough bytes"
                    error = self._incomplete(buf, off)
                    if error is None:
                        break  # wait for more bytes
                    events.append(Failed(error))
                    return events
                except ValueError as exc:
                    events.append(Failed(WireError(f"malformed packet from the broker: {exc}")))
                    return events
                off += size
                if type(packet) is PubAckPacket:
                    # the hot path, inlined: a successful ack of a batch's message
                    packet_id = packet.packet_id
                    if packet_id not in inflight:
                        continue  # not ours (settled when a connection was lost)
                    batch = inflight.pop(packet_id)
                    if batch is not None and int(packet.reason_code) < FAILURE:
                        batch.remaining -= 1
                        if batch.remaining == 0:
                            batch.settled()
                    elif batch is None:
                        events.append(PubAck(packet_id, int(packet.reason_code)))
                    else:
                        self._refused(packet, batch)
                    continue
                event = self._on_packet(packet)
                if event is not None:
                    events.append(event)
                    if type(event) is Failed:
                        return events
        if buf is inbuf:
            del inbuf[:off]
        elif off < end:
            inbuf += data[off:]
        return events

    def _incomplete(self, buf: bytes | bytearray, off: int) -> WireError | None:
        """After mqtt5.read found too few bytes at `off`: None to wait for more, else why
        the packet is malformed or too large."""
        frame = frame_size(buf, off)
        if frame is None:
            return None
        if frame <= len(buf) - off:  # all of it is here: its fields claim more than it holds
            return WireError("malformed packet from the broker: truncated")
        if frame > MAX_INCOMING:
            return WireError(f"broker sent a {frame}-byte packet; we accept {MAX_INCOMING}")
        return None

    @staticmethod
    def _refused(packet: PubAckPacket, batch: Batch) -> None:
        """A PUBACK with a failure code for a batch's message: the batch fails once settled."""
        if batch.error is None:
            batch.error = refusal("broker refused a message", packet.reason_code,
                                  packet.reason_str)
        batch.settle_one()

    def _on_packet(self, packet: mqtt5.Packet) -> Event | None:
        if isinstance(packet, PublishPacket):
            if packet.qos == QoS.AT_LEAST_ONCE and packet.packet_id is not None:
                self.out += PubAckPacket(packet.packet_id).write()
            elif packet.qos == QoS.EXACTLY_ONCE:
                return Failed(WireError("broker sent a QoS 2 message; we subscribe with QoS 1"))
            return Incoming(
                packet.topic, packet.payload, packet.response_topic, packet.correlation_data,
                packet.retain,
            )
        if isinstance(packet, PingRespPacket):
            self.ping_deadline = None
            return PING_RESP
        if isinstance(packet, SubAckPacket):
            topics = self._subscribing.get(packet.packet_id)
            if topics is None:
                return None
            return SubAck(packet.packet_id, suback_error(topics, packet.reason_codes))
        if isinstance(packet, ConnAckPacket):
            return self._on_connack(packet)
        if isinstance(packet, DisconnectPacket):
            return Failed(refusal("broker disconnected us", packet.reason_code,
                                  packet.reason_str))
        if isinstance(packet, PingReqPacket):
            self.out += PingRespPacket().write()
            return None
        return Failed(WireError(f"unexpected {type(packet).__name__} from the broker"))

    def _on_connack(self, packet: ConnAckPacket) -> Event:
        if self._connack_seen:
            return Failed(WireError("unexpected CONNACK from the broker"))
        self._connack_seen = True
        if int(packet.reason_code) >= FAILURE:
            return Refused(refusal("broker refused the connection", packet.reason_code,
                                   packet.reason_str))
        self.window = max(1, packet.receive_max)
        self.max_packet_size = packet.max_packet_size
        self.max_qos = min(1, int(packet.max_qos))
        self.retain_available = packet.retain_available
        # No more aliases than the Receive Maximum: mosquitto 2.0.11 disconnects a client whose
        # alias exceeds it (protocol error), whatever Topic Alias Maximum it announced.
        self.topic_alias_max = min(packet.topic_alias_max, self.window)
        if packet.server_keep_alive is not None:
            self.keepalive = packet.server_keep_alive
        self.connected = True
        return Connected()

