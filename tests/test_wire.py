"""bridge.mqtt.wire.WireClient: against a real mosquitto, and its parser fed by hand."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import mqtt5
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bridge.errors import BrokerError
from bridge.mqtt.wire import Incoming, WindowFull, WireClient, WireError
from tests.helpers import (
    WAIT,
    Broker,
    Pki,
    free_port,
    make_pki,
    mosquitto,
    mosquitto_tls,
    recording,
    until,
)

TOPIC = "m2m/wire"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    # Room for 10,000 QoS 1 messages queued for a subscriber that falls behind.
    with mosquitto(tmp_path, "max_queued_messages 20000\n") as running:
        yield running


@contextlib.asynccontextmanager
async def connected(port: int, **options: Any) -> AsyncIterator[WireClient]:
    client = WireClient(host="127.0.0.1", port=port, client_id=options.pop("client_id", "wire"),
                        **options)
    await client.connect()
    try:
        yield client
    finally:
        await client.disconnect()


# --- against mosquitto ---------------------------------------------------------------------


@pytest.mark.integration
async def test_publishes_qos0_and_qos1_in_order_byte_for_byte(broker: Broker) -> None:
    sent = [
        (f"{TOPIC}/a", b"first", 0, False),
        (f"{TOPIC}/b", b"\x00\xff binary \r\n", 1, False),
        (f"{TOPIC}/c", b'{"value": 230.5}', 1, True),
        (f"{TOPIC}/d", b"", 0, False),
        (f"{TOPIC}/e", b"retained qos 0", 0, True),
        (f"{TOPIC}/a", b"x" * 70_000, 1, False),  # several reads' worth
    ]
    async with recording(broker.port, f"{TOPIC}/#") as recorder, connected(broker.port) as client:
        assert client.window == 20  # mosquitto's default Receive Maximum, from CONNACK
        await client.publish_batch(sent[:3])
        packet_id = client.publish_nowait(*sent[3])
        assert packet_id is None
        await client.publish_batch(sent[4:])
        # Negative check: a duplicate of any of them would arrive before a marker sent after
        # them on the same connection (the broker keeps one client's messages in order).
        await client.publish_batch([(f"{TOPIC}/end", b"", 1, False)])
        await recorder.wait_for(lambda: recorder.payloads(f"{TOPIC}/end"))
        assert [(t, p) for t, p, _ in recorder.messages[:-1]] == [(t, p) for t, p, _, _ in sent]
    # The retained ones are kept by the broker, byte for byte.
    async with recording(broker.port, f"{TOPIC}/#") as later, connected(broker.port) as client:
        # Negative check: the broker sends every retained message on subscribe, so a third
        # would arrive before a marker published after the subscription.
        await client.publish_batch([(f"{TOPIC}/end", b"", 1, False)])
        await later.wait_for(lambda: later.payloads(f"{TOPIC}/end"))
        assert sorted(m for m in later.messages if m[0] != f"{TOPIC}/end") == [
            (f"{TOPIC}/c", b'{"value": 230.5}', True), (f"{TOPIC}/e", b"retained qos 0", True)
        ]


@pytest.mark.integration
async def test_ten_thousand_qos1_messages_arrive_in_order(broker: Broker) -> None:
    sent = [(f"{TOPIC}/meter-{i % 7}/p", f"{i}".encode(), 1, False) for i in range(10_000)]
    async with recording(broker.port, f"{TOPIC}/#") as recorder, connected(broker.port) as client:
        await client.publish_batch(sent[:500])
        await client.publish_batch(sent[500:])  # one batch much larger than the window
        assert client.in_flight == 0
        await recorder.wait_for(lambda: len(recorder.messages) >= len(sent), timeout=60)
        assert [(t, p) for t, p, _ in recorder.messages] == [(t, p) for t, p, _, _ in sent]


@pytest.mark.integration
async def test_publish_nowait_reports_pubacks_and_packet_ids(broker: Broker) -> None:
    acked: list[tuple[int, int]] = []
    async with connected(broker.port, on_puback=lambda i, c: acked.append((i, c))) as client:
        ids = []
        for n in range(client.window):
            packet_id = client.publish_nowait(f"{TOPIC}/n", b"%d" % n, 1, False)
            assert packet_id is not None
            ids.append(packet_id)
        assert len(set(ids)) == len(ids)
        with pytest.raises(WindowFull):
            client.publish_nowait(f"{TOPIC}/n", b"too many", 1, False)
        await client.wait_window()
        await client.wait_acked()
        # mosquitto: 16 "no matching subscribers" is a success code
        assert sorted(i for i, _ in acked) == sorted(ids)
        assert all(code < 0x80 for _, code in acked)


@pytest.mark.integration
async def test_commands_arrive_with_response_topic_and_correlation_data(broker: Broker) -> None:
    async with (
        connected(broker.port) as bridge,
        aiomqtt.Client("127.0.0.1", broker.port, identifier="commander",
                       protocol=aiomqtt.ProtocolVersion.V5) as commander,
    ):
        await bridge.subscribe([f"{TOPIC}/dev/+/set", f"{TOPIC}/other/set"], qos=1)
        await commander.subscribe(f"{TOPIC}/replies/#", qos=1)
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        properties.ResponseTopic = f"{TOPIC}/replies/1"
        properties.CorrelationData = b"\x01corr"
        await commander.publish(f"{TOPIC}/dev/sp/set", b"42.5", qos=1, properties=properties)
        await commander.publish(f"{TOPIC}/other/set", b"true", qos=0)
        await commander.publish(f"{TOPIC}/not-subscribed", b"no", qos=1)

        received: list[Incoming] = []
        async with asyncio.timeout(WAIT):
            async for message in bridge.incoming():
                received.append(message)
                if len(received) == 2:
                    break
        assert received == [
            Incoming(f"{TOPIC}/dev/sp/set", b"42.5", f"{TOPIC}/replies/1", b"\x01corr"),
            Incoming(f"{TOPIC}/other/set", b"true", None, None),
        ]
        # The reply, with the correlation data, reaches the commander.
        command = received[0]
        assert command.response_topic is not None
        bridge.publish_nowait(command.response_topic, b'{"ok": true}', 1, False,
                              correlation_data=command.correlation_data)
        await bridge.wait_acked()
        async with asyncio.timeout(WAIT):
            async for reply in commander.messages:
                assert str(reply.topic) == f"{TOPIC}/replies/1"
                assert reply.payload == b'{"ok": true}'
                assert reply.properties is not None
                assert getattr(reply.properties, "CorrelationData", None) == b"\x01corr"
                break


@pytest.mark.integration
async def test_abort_publishes_the_will_and_disconnect_does_not(broker: Broker) -> None:
    will = (f"{TOPIC}/status", b"offline", 1, True)
    async with recording(broker.port, f"{TOPIC}/status") as recorder:
        clean = WireClient(host="127.0.0.1", port=broker.port, client_id="clean", will=will)
        await clean.connect()
        await clean.publish_batch([(f"{TOPIC}/status", b"online", 1, True)])
        await clean.disconnect()
        await clean.wait_closed()  # None: a clean close
        await recorder.wait_for(lambda: recorder.payloads(f"{TOPIC}/status") == [b"online"])

        dying = WireClient(host="127.0.0.1", port=broker.port, client_id="dying", will=will)
        await dying.connect()
        dying.abort()  # transport.abort(): no DISCONNECT
        await recorder.wait_for(lambda: recorder.last(f"{TOPIC}/status") == b"offline")
        # Negative check: the clean close, long before this connection was even made, left no
        # will: the one `offline` is the aborted client's.
        assert recorder.payloads(f"{TOPIC}/status") == [b"online", b"offline"]
        with pytest.raises(WireError):
            await dying.wait_closed()


@pytest.mark.integration
async def test_broker_stopped_mid_batch_raises_without_hanging(broker: Broker) -> None:
    client = WireClient(host="127.0.0.1", port=broker.port, client_id="stopped", keepalive=5)
    await client.connect()
    messages = [(f"{TOPIC}/x", b"%d" % i, 1, False) for i in range(200_000)]
    batch = asyncio.create_task(client.publish_batch(messages))
    await until(lambda: client.in_flight > 0, what="the batch to be under way")
    assert not batch.done()
    broker.stop()
    async with asyncio.timeout(WAIT):
        with pytest.raises(WireError, match="connection"):
            await batch
        with pytest.raises(WireError):
            await client.wait_closed()
        with pytest.raises(WireError):
            await client.publish_batch(messages[:1])
        with pytest.raises(WireError):
            async for _ in client.incoming():
                pass
    assert isinstance(WireError("x"), BrokerError)


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[Broker]:
    """A mosquitto that knows one user, bridge / s3cret, and refuses anonymous clients."""
    passwords = tmp_path / "passwd"
    exe = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    subprocess.run([exe, "-b", "-c", str(passwords), "bridge", "s3cret"], check=True,
                   capture_output=True)
    with mosquitto(tmp_path, f"allow_anonymous false\npassword_file {passwords}\n") as running:
        yield running


@pytest.mark.integration
async def test_refused_login_names_not_authorized(secured: Broker) -> None:
    refused = WireClient(host="127.0.0.1", port=secured.port, client_id="a",
                         username="bridge", password="wrong")
    with pytest.raises(WireError, match=r"refused the connection: not authorized \(135\)"):
        await refused.connect()
    with pytest.raises(WireError):
        await asyncio.wait_for(refused.wait_closed(), 5)
    anonymous = WireClient(host="127.0.0.1", port=secured.port, client_id="b")
    with pytest.raises(WireError, match="not authorized"):
        await anonymous.connect()
    async with connected(secured.port, username="bridge", password="s3cret") as client:
        await client.publish_batch([(f"{TOPIC}/ok", b"1", 1, False)])


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[tuple[Broker, Pki]]:
    pki = make_pki(tmp_path / "pki")
    acl = "user bridge\ntopic readwrite m2m/#\n"
    with mosquitto_tls(tmp_path, pki, {"bridge": "s3cret"}, acl) as running:
        yield running, pki


def tls_context(pki: Pki, ca: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    return context


@pytest.mark.integration
async def test_tls_connects_and_a_wrong_ca_is_one_line(
    tls_broker: tuple[Broker, Pki],
) -> None:
    broker, pki = tls_broker
    async with connected(broker.port, username="bridge", password="s3cret",
                         ssl=tls_context(pki, pki.ca)) as client:
        await client.publish_batch([(f"{TOPIC}/tls", b"1", 1, False)] * 50)
    wrong = WireClient(host="127.0.0.1", port=broker.port, client_id="wrong-ca",
                       username="bridge", password="s3cret", ssl=tls_context(pki, pki.other_ca))
    with pytest.raises(WireError, match="certificate verify failed") as caught:
        await wrong.connect()
    assert "\n" not in str(caught.value)


async def test_nothing_listening_is_one_line_wire_error() -> None:
    client = WireClient(host="127.0.0.1", port=free_port(), client_id="nobody")
    with pytest.raises(WireError) as caught:
        await client.connect()
    message = str(caught.value)
    assert message.startswith(f"cannot connect to 127.0.0.1:{client.port}: ")
    assert "\n" not in message


# --- the protocol fed by hand --------------------------------------------------------------


class FakeTransport(asyncio.Transport):
    """Records what is written; closing tells the protocol on the next loop iteration."""

    def __init__(self, protocol: asyncio.BaseProtocol) -> None:
        super().__init__()
        self.protocol = protocol
        self.writes: list[bytes] = []
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closing
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.abort()

    def abort(self) -> None:
        if not self.closing:
            self.closing = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def packets(self) -> list[mqtt5.Packet]:
        """Every packet written so far, parsed back."""
        data = b"".join(self.writes)
        found, offset = [], 0
        while offset < len(data):
            packet, size = mqtt5.read(memoryview(data)[offset:])
            found.append(packet)
            offset += size
        return found


def feed_bytewise(client: WireClient, data: bytes) -> None:
    for i in range(len(data)):
        client.data_received(data[i : i + 1])


def hand_driven(receive_max: int = 3, keepalive: int = 0) -> tuple[WireClient, FakeTransport]:
    client = WireClient(host="test", port=1, client_id="unit", keepalive=keepalive)
    transport = FakeTransport(client)
    client.connection_made(transport)
    feed_bytewise(client, mqtt5.ConnAckPacket(receive_max=receive_max).write())
    assert client.is_connected
    assert client.window == receive_max
    return client, transport


async def test_partial_packets_and_window_byte_by_byte() -> None:
    client, transport = hand_driven(receive_max=3)
    messages = [(f"t/{i}", b"payload %d" % i, 1, False) for i in range(5)]
    task = asyncio.create_task(client.publish_batch(messages))
    for _ in range(3):
        await asyncio.sleep(0)
    # The window (3) is full: the first three went out in ONE write.
    assert len(transport.writes) == 1
    first = transport.packets()
    assert [p.topic for p in first if isinstance(p, mqtt5.PublishPacket)] == ["t/0", "t/1", "t/2"]
    assert client.in_flight == 3
    ids = [p.packet_id for p in first if isinstance(p, mqtt5.PublishPacket)]
    assert len(set(ids)) == 3
    assert all(i is not None and 1 <= i <= 65535 for i in ids)

    # Acks for two, one byte at a time: room for the remaining two.
    feed_bytewise(client, b"".join(mqtt5.PubAckPacket(i).write() for i in ids[:2]
                                   if i is not None))
    for _ in range(3):
        await asyncio.sleep(0)
    assert not task.done()
    later = [p for p in transport.packets() if isinstance(p, mqtt5.PublishPacket)]
    assert [p.topic for p in later] == ["t/0", "t/1", "t/2", "t/3", "t/4"]
    assert len(transport.writes) == 2

    # The last three acks in one chunk, with a PINGRESP and half a PUBLISH behind them.
    rest = [p.packet_id for p in later[2:] if p.packet_id is not None]
    command = mqtt5.PublishPacket("cmd/set", b"42", qos=mqtt5.QoS.AT_LEAST_ONCE, packet_id=7,
                                  response_topic="cmd/reply", correlation_data=b"c1").write()
    chunk = b"".join(mqtt5.PubAckPacket(i).write() for i in rest)
    client.data_received(chunk + mqtt5.PingRespPacket().write() + command[:5])
    await asyncio.wait_for(task, 1)
    assert client.in_flight == 0

    feed_bytewise(client, command[5:])
    incoming = client.incoming()
    assert await asyncio.wait_for(anext(incoming), 1) == Incoming(
        "cmd/set", b"42", "cmd/reply", b"c1"
    )
    await asyncio.sleep(0)
    acks = [p for p in transport.packets() if isinstance(p, mqtt5.PubAckPacket)]
    assert [a.packet_id for a in acks] == [7]  # the incoming QoS 1 is acknowledged
    await client.disconnect()
    assert isinstance(transport.packets()[-1], mqtt5.DisconnectPacket)
    with pytest.raises(StopAsyncIteration):
        await anext(incoming)


async def test_failed_puback_fails_the_batch_after_it_settles() -> None:
    client, transport = hand_driven(receive_max=10)
    task = asyncio.create_task(client.publish_batch([("a", b"1", 1, False), ("b", b"2", 1, False)]))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    first, second = (p.packet_id for p in transport.packets()
                     if isinstance(p, mqtt5.PublishPacket))
    assert first is not None
    assert second is not None
    client.data_received(mqtt5.PubAckPacket(
        first, reason_code=mqtt5.PubAckReasonCode.NOT_AUTHORIZED).write())
    await asyncio.sleep(0)
    assert not task.done()  # waits for the whole batch to be settled
    client.data_received(mqtt5.PubAckPacket(second).write())
    with pytest.raises(WireError, match=r"broker refused a message: not authorized \(135\)"):
        await asyncio.wait_for(task, 1)
    assert client.is_connected  # a refused message is not a lost connection


async def test_malformed_packet_drops_the_connection() -> None:
    client, _ = hand_driven()
    task = asyncio.create_task(client.publish_batch([("a", b"1", 1, False)]))
    await asyncio.sleep(0)
    client.data_received(b"\xff\x00")
    with pytest.raises(WireError, match="malformed packet"):
        await asyncio.wait_for(task, 1)
    with pytest.raises(WireError, match="malformed packet"):
        await asyncio.wait_for(client.wait_closed(), 1)


async def test_broker_disconnect_names_its_reason() -> None:
    client, _ = hand_driven()
    client.data_received(mqtt5.DisconnectPacket(
        reason_code=mqtt5.DisconnectReasonCode.SESSION_TAKEN_OVER).write())
    with pytest.raises(WireError, match=r"session taken over \(142\)"):
        await asyncio.wait_for(client.wait_closed(), 1)


async def test_packet_ids_wrap_and_skip_those_in_flight() -> None:
    client, _ = hand_driven(receive_max=100)
    client._state.next_id = 65534
    ids = [client.publish_nowait("t", b"", 1, False) for _ in range(3)]
    assert ids == [65534, 65535, 1]
    client._state.next_id = 65534  # both still in flight: skipped
    assert client.publish_nowait("t", b"", 1, False) == 2


async def test_keepalive_pings_then_gives_up_without_pingresp() -> None:
    client, transport = hand_driven(keepalive=1)
    # The PINGREQ is due after 1 s idle, the give-up 1 s after it: polled every 50 ms, the
    # ping is seen while still connected however late this loop runs.
    await until(lambda: any(isinstance(p, mqtt5.PingReqPacket) for p in transport.packets()),
                what="a PINGREQ")
    assert client.is_connected
    with pytest.raises(WireError, match="no PINGRESP"):
        await asyncio.wait_for(client.wait_closed(), 3)


async def test_keepalive_survives_with_pingresp() -> None:
    client, transport = hand_driven(keepalive=1)
    for _ in range(3):  # three rounds of ping and answer: past three give-up deadlines
        await until(lambda: any(isinstance(p, mqtt5.PingReqPacket)
                                for p in transport.packets()), what="a PINGREQ")
        transport.writes.clear()
        client.data_received(mqtt5.PingRespPacket().write())
        assert client.is_connected
    await client.disconnect()


async def test_an_oversized_packet_is_refused_before_it_is_buffered() -> None:
    client, _ = hand_driven()
    # A PUBLISH header announcing 200 MB: dropped at once, not buffered until it arrives.
    client.data_received(b"\x30\x80\x80\xc0\x5f")
    with pytest.raises(WireError, match="byte packet; we accept"):
        await asyncio.wait_for(client.wait_closed(), 1)
