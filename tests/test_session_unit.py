"""Broker sessions (bridge.mqtt.session) against fakes of the layer below: no broker, no socket.

MQTT 5 sessions run the real WireClient over `ByteBroker` (tests/fakewire.py), a transport
that answers the client's bytes as a broker would; MQTT 3.1.1 sessions run over a fake aiomqtt
client. What a user sees: the will that says `offline`, a clean goodbye that does not, batches
that are delivered only once acknowledged and fail as one BrokerError, commands that arrive
with their reply address, and one line naming what to fix when a connection cannot be made.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import mqtt5
import pytest
from aiomqtt.exceptions import MqttCodeError, MqttConnectError

import bridge.mqtt.session
from bridge.config import MqttSettings, Tls
from bridge.core.messages import Message
from bridge.errors import BrokerError
from bridge.mqtt.session import (
    AIOMQTT_BATCH,
    WIRE_BATCH,
    Session,
    Version,
    describe_connect_failure,
    open_session,
)
from bridge.mqtt.wireevents import Incoming, VersionRefused, WireError
from tests.fakewire import ByteBroker, eventually

WILL = "m2m/gw/status"
QOS1 = mqtt5.QoS.AT_LEAST_ONCE


def settings(**changes: Any) -> MqttSettings:
    values: dict[str, Any] = {
        "host": "broker.test", "client_id": "gw-unit", "username": "bridge",
        "password": "s3cret", "keepalive": 20, "topic_prefix": "m2m/gw",
    }
    return MqttSettings(**(values | changes))


def message(topic: str, payload: bytes = b"1", qos: int = 1, retain: bool = False) -> Message:
    return Message(topic, payload, qos, retain, 0)


# ------------------------------------------------------------------ MQTT 5: connecting


async def test_a_session_connects_with_an_offline_will_and_leaves_with_a_disconnect(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made = ByteBroker.install(monkeypatch)
    async with open_session(settings(), WILL) as session:
        assert session.batch == WIRE_BATCH
    [wire] = made
    [connect] = wire.sent(mqtt5.ConnectPacket)
    assert (connect.client_id, connect.username, connect.password) == (
        "gw-unit", "bridge", b"s3cret")
    assert connect.keep_alive == 20
    assert connect.clean_start
    will = connect.will
    assert will is not None
    assert (will.topic, will.payload, will.qos, will.retain) == (WILL, b"offline", QOS1, True)
    assert wire.sent(mqtt5.DisconnectPacket)  # a clean goodbye: the broker drops the will
    assert wire.closing


async def test_a_failure_inside_a_session_drops_it_without_a_goodbye(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made = ByteBroker.install(monkeypatch)
    with pytest.raises(RuntimeError, match="a bug"):
        async with open_session(settings(), WILL):
            raise RuntimeError("a bug")
    [wire] = made
    assert wire.closing
    assert not wire.sent(mqtt5.DisconnectPacket)  # so the broker publishes the will


async def test_a_refused_login_is_one_line_naming_the_settings_to_check(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ByteBroker.install(monkeypatch, connack=mqtt5.ConnAckPacket(
        reason_code=mqtt5.ConnAckReasonCode.NOT_AUTHORIZED))
    with pytest.raises(BrokerError) as caught:
        async with open_session(settings(), WILL):
            pytest.fail("connected although refused")
    assert describe_connect_failure(caught.value) == (
        "broker refused login",
        "broker refused the connection: not authorized (135)"
        " (check mqtt.username and the password it is given)",
    )


async def test_a_broker_without_mqtt_5_is_version_refused_and_a_pin_names_the_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """NATS answers an MQTT 5 CONNECT with a 3.1.1 CONNACK, return code 1."""
    made = ByteBroker.install(monkeypatch, connack=b"\x20\x02\x00\x01")
    with pytest.raises(VersionRefused) as caught:
        async with open_session(settings(protocol=5), WILL):
            pytest.fail("connected although refused")
    assert made[0].closing
    event, reason = describe_connect_failure(caught.value)
    assert event == "broker does not speak MQTT 5"
    assert reason.endswith("mqtt.protocol is 5: set it to auto (or 3.1.1) for this broker")


async def test_nothing_listening_is_one_line_naming_the_broker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ByteBroker.install(monkeypatch, refuse=ConnectionRefusedError(
        111, "Connect call failed ('192.0.2.1', 1883)"))
    with pytest.raises(BrokerError) as caught:
        async with open_session(settings(), WILL):
            pytest.fail("connected to nothing")
    assert describe_connect_failure(caught.value) == (
        "broker unreachable", "cannot connect to broker.test:1883: Connection refused")


async def test_an_unreadable_ca_file_is_a_settings_problem_found_before_connecting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    made = ByteBroker.install(monkeypatch)
    missing = tmp_path / "ca.pem"
    with pytest.raises(BrokerError) as caught:
        async with open_session(settings(tls=Tls(ca_file=str(missing))), WILL):
            pytest.fail("connected without its CA")
    assert made == []
    assert describe_connect_failure(caught.value) == (
        "broker settings unusable",
        f"mqtt.tls.ca_file {missing}: cannot load: No such file or directory",
    )


# ------------------------------------------------------------------ MQTT 5: publishing


async def test_a_batch_is_delivered_only_once_every_qos1_message_is_acknowledged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made = ByteBroker.install(monkeypatch)
    async with open_session(settings(), WILL) as session:
        [wire] = made
        wire.holding = True
        batch = [message("m2m/gw/a/v", b"1"), message("m2m/gw/b/v", b"2", retain=True),
                 message("m2m/gw/c/v", b"3", qos=0)]
        publishing = asyncio.create_task(session.publish_batch(batch))
        await eventually(lambda: len(wire.held) == 2, what="the QoS 1 messages to be sent")
        for _ in range(5):
            await asyncio.sleep(0)
        assert not publishing.done()  # sent is not delivered
        wire.release()
        await asyncio.wait_for(publishing, 5)
        sent = wire.sent(mqtt5.PublishPacket)
        assert [(p.topic, p.payload, p.qos, p.retain) for p in sent] == [
            ("m2m/gw/a/v", b"1", QOS1, False), ("m2m/gw/b/v", b"2", QOS1, True),
            ("m2m/gw/c/v", b"3", mqtt5.QoS.AT_MOST_ONCE, False),
        ]


async def test_a_message_the_broker_refuses_fails_its_batch_with_a_broker_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made = ByteBroker.install(
        monkeypatch, puback_codes={"m2m/gw/x/v": mqtt5.PubAckReasonCode.NOT_AUTHORIZED})
    async with open_session(settings(), WILL) as session:
        batch = [message("m2m/gw/a/v"), message("m2m/gw/x/v"), message("m2m/gw/b/v")]
        with pytest.raises(BrokerError, match=r"broker refused a message: not authorized \(135\)"):
            await session.publish_batch(batch)
        assert len(made[0].sent(mqtt5.PublishPacket)) == 3  # the batch is retried whole
        await session.publish_batch([message("m2m/gw/a/v")])  # the connection is still good


async def test_a_connection_lost_mid_batch_fails_it_with_a_broker_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made = ByteBroker.install(monkeypatch)
    async with open_session(settings(), WILL) as session:
        made[0].holding = True
        publishing = asyncio.create_task(session.publish_batch([message("m2m/gw/a/v")]))
        await eventually(lambda: bool(made[0].held))
        made[0].drop()
        with pytest.raises(BrokerError) as caught:
            await asyncio.wait_for(publishing, 5)
    assert str(caught.value) == "connection to the broker lost: Connection reset by peer"
    assert describe_connect_failure(caught.value)[0] == "broker unreachable"


async def test_a_status_waits_for_its_puback_but_a_reply_does_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made = ByteBroker.install(monkeypatch)
    async with open_session(settings(), WILL) as session:
        wire = made[0]
        wire.holding = True
        await asyncio.wait_for(
            session.publish("reply/to", b'{"ok": true}', 1, False, correlation_data=b"c-1"), 5)
        await eventually(lambda: bool(wire.sent(mqtt5.PublishPacket)))
        [reply] = wire.sent(mqtt5.PublishPacket)
        assert (reply.topic, reply.qos, reply.retain, reply.correlation_data) == (
            "reply/to", QOS1, False, b"c-1")
        status = asyncio.create_task(session.publish("m2m/gw/a/status", b"online", 1, True))
        await eventually(lambda: len(wire.held) == 2)
        assert not status.done()
        wire.release()
        await asyncio.wait_for(status, 5)


# ------------------------------------------------------------------ MQTT 5: commands


async def test_subscriptions_are_qos1_and_a_refused_one_is_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made = ByteBroker.install(
        monkeypatch, suback_codes={"m2m/gw/+/+/set": mqtt5.SubAckReasonCode.NOT_AUTHORIZED})
    async with open_session(settings(), WILL) as session:
        await session.subscribe([])  # nothing to subscribe: nothing sent
        assert not made[0].sent(mqtt5.SubscribePacket)
        with pytest.raises(BrokerError) as caught:
            await session.subscribe(["m2m/gw/+/+/set"])
        [subscribe] = made[0].sent(mqtt5.SubscribePacket)
        assert [(f.pattern, f.max_qos) for f in subscribe.topic_filters] == [
            ("m2m/gw/+/+/set", QOS1)]
    assert str(caught.value) == (
        "broker refused the subscription: m2m/gw/+/+/set: not authorized (135)")


async def test_a_command_arrives_with_its_reply_address_and_is_acknowledged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made = ByteBroker.install(monkeypatch)
    async with open_session(settings(), WILL) as session:
        await session.subscribe(["m2m/gw/+/+/set"])
        made[0].send(mqtt5.PublishPacket(
            "m2m/gw/valve/open/set", b"true", qos=QOS1, packet_id=7,
            response_topic="reply/to", correlation_data=b"c-1"))
        commands = session.incoming()
        command = await asyncio.wait_for(anext(commands), 5)
        assert command == Incoming("m2m/gw/valve/open/set", b"true", "reply/to", b"c-1", False)
        await eventually(lambda: bool(made[0].sent(mqtt5.PubAckPacket)))
        assert [p.packet_id for p in made[0].sent(mqtt5.PubAckPacket)] == [7]
        made[0].drop()
        with pytest.raises(BrokerError, match="connection to the broker lost"):
            await asyncio.wait_for(anext(commands), 5)


# ------------------------------------------------------------------ MQTT 3.1.1 (aiomqtt)


class FakeAiomqtt:
    """An aiomqtt.Client as the 3.1.1 session uses it: connect on enter, publish, subscribe,
    messages."""

    def __init__(self, will: aiomqtt.Will | None) -> None:
        self.will = will
        self.refusal: BaseException | None = None
        self.failing: dict[str, BaseException] = {}  # topic -> what its publish raises
        self.published: list[tuple[str, bytes, int, bool]] = []
        self.subscribed: list[tuple[str, int]] = []
        self.inbox: list[aiomqtt.Message] = []
        self.exited = False

    async def __aenter__(self) -> FakeAiomqtt:
        if self.refusal is not None:
            raise self.refusal
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.exited = True

    async def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        await asyncio.sleep(0)
        if topic in self.failing:
            raise self.failing[topic]
        self.published.append((topic, payload, qos, retain))

    async def subscribe(self, topic: str, qos: int) -> None:
        self.subscribed.append((topic, qos))

    @property
    def messages(self) -> AsyncIterator[aiomqtt.Message]:
        async def each() -> AsyncIterator[aiomqtt.Message]:
            for item in self.inbox:
                yield item
            raise aiomqtt.MqttError("Disconnected during message iteration")

        return each()


class AioClients:
    """`make_client`'s stand-in: the fake clients it made, and refusals for the next connects."""

    def __init__(self) -> None:
        self.made: list[FakeAiomqtt] = []
        self.refusals: list[BaseException] = []

    def __call__(self, _settings: MqttSettings, *, will: aiomqtt.Will | None = None,
                 version: Version | None = None) -> Any:
        assert version == "3.1.1"  # the session's aiomqtt path is the 3.1.1 one
        client = FakeAiomqtt(will)
        if self.refusals:
            client.refusal = self.refusals.pop(0)
        self.made.append(client)
        return client


@pytest.fixture
def aio(monkeypatch: pytest.MonkeyPatch) -> AioClients:
    clients = AioClients()
    monkeypatch.setattr(bridge.mqtt.session, "make_client", clients)
    return clients


async def test_a_311_session_sets_the_will_and_publishes_a_batch_as_one(
    aio: AioClients,
) -> None:
    async with open_session(settings(protocol="3.1.1"), WILL) as session:
        assert session.batch == AIOMQTT_BATCH
        await session.publish_batch([message("m2m/gw/a/v", b"1"), message("m2m/gw/b/v", b"2")])
        await session.publish("reply/to", b"{}", 1, False, correlation_data=b"c-1")
        await session.subscribe(["m2m/gw/+/+/set"])
    [client] = aio.made
    assert client.will is not None
    assert (client.will.topic, client.will.payload, client.will.qos, client.will.retain) == (
        WILL, b"offline", 1, True)
    # 3.1.1 has no properties: the reply goes without its correlation data.
    assert client.published == [("m2m/gw/a/v", b"1", 1, False), ("m2m/gw/b/v", b"2", 1, False),
                                ("reply/to", b"{}", 1, False)]
    assert client.subscribed == [("m2m/gw/+/+/set", 1)]
    assert client.exited


async def test_a_311_failure_is_a_broker_error_and_a_refused_login_names_the_settings(
    aio: AioClients,
) -> None:
    async with open_session(settings(protocol="3.1.1"), WILL) as session:
        aio.made[0].failing["m2m/gw/x/v"] = MqttCodeError(7)  # paho: the connection was lost
        with pytest.raises(BrokerError, match=r"\[code:7\] The connection was lost"):
            await session.publish_batch([message("m2m/gw/a/v"), message("m2m/gw/x/v")])
    aio.refusals.append(MqttConnectError(5))
    with pytest.raises(BrokerError) as caught:
        async with open_session(settings(protocol="3.1.1"), WILL):
            pytest.fail("connected although refused")
    assert isinstance(caught.value, WireError)
    assert caught.value.reason_code == 5
    event, reason = describe_connect_failure(caught.value)
    assert event == "broker refused login"
    assert reason.endswith("(check mqtt.username and the password it is given)")
    assert "\n" not in reason


async def test_a_311_command_arrives_as_bytes_and_a_lost_connection_ends_the_stream(
    aio: AioClients,
) -> None:
    received: list[Incoming] = []

    async def receive(session: Session) -> None:
        async for command in session.incoming():
            received.append(command)

    async with open_session(settings(protocol="3.1.1"), WILL) as session:
        aio.made[0].inbox.append(aiomqtt.Message(
            "m2m/gw/valve/open/set", b"true", qos=1, retain=False, mid=1, properties=None))
        with pytest.raises(BrokerError, match="Disconnected during message iteration"):
            await receive(session)
    assert received == [Incoming("m2m/gw/valve/open/set", b"true", None, None, False)]


# ------------------------------------------------------------------ why a connect failed


def _caused_by(cause: BaseException) -> WireError:
    error = WireError("cannot connect to broker.test:8883: TLS")
    error.__cause__ = cause
    return error


def _cert_error() -> ssl.SSLCertVerificationError:
    cert = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] verify failed")
    cert.verify_message = "unable to get local issuer certificate"
    cert.reason = "CERTIFICATE_VERIFY_FAILED"
    return cert


def _tls_error() -> ssl.SSLError:
    error = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
    error.reason = "WRONG_VERSION_NUMBER"
    return error


@pytest.mark.parametrize(("error", "event", "reason"), [
    (_caused_by(_cert_error()), "broker certificate verification failed",
     "certificate verify failed: unable to get local issuer certificate"
     " (check mqtt.tls.ca_file and mqtt.host)"),
    (_caused_by(_tls_error()), "broker TLS handshake failed", "WRONG_VERSION_NUMBER"),
    (WireError("broker refused the connection: bad user name or password (134)",
               reason_code=0x86), "broker refused login",
     "broker refused the connection: bad user name or password (134)"
     " (check mqtt.username and the password it is given)"),
    (WireError("Connection refused: not authorised", reason_code=5), "broker refused login",
     "Connection refused: not authorised (check mqtt.username and the password it is given)"),
    (WireError("broker refused the connection: server busy (137)", reason_code=137),
     "broker refused connection", "broker refused the connection: server busy (137)"),
    (WireError("cannot connect to broker.test:1883: no answer within 10s"),
     "broker unreachable", "cannot connect to broker.test:1883: no answer within 10s"),
    (BrokerError("mqtt.tls.cert_file/key_file c.pem, k.pem: cannot load: PEM lib"),
     "broker settings unusable", "mqtt.tls.cert_file/key_file c.pem, k.pem: cannot load: PEM lib"),
    (OSError(113, "No route to host"), "broker unreachable", "[Errno 113] No route to host"),
], ids=["certificate", "tls", "mqtt5-login", "mqtt311-login", "refused", "unreachable",
        "settings", "oserror"])
def test_a_failed_connect_is_described_in_one_line_naming_what_to_fix(
    error: BaseException, event: str, reason: str
) -> None:
    assert describe_connect_failure(error) == (event, reason)
    assert "\n" not in reason
