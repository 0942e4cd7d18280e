"""bridge.mqtt.wireproto.WireState: the MQTT client's protocol state, driven with bytes only.

No socket, no event loop: packets are built with the `mqtt5` codec, fed to `receive`, and what
the state queued is read back from `take_out`.
"""

from __future__ import annotations

import mqtt5
import pytest

from bridge.mqtt.wireevents import (
    Batch,
    Connected,
    Failed,
    Incoming,
    PingResp,
    PubAck,
    Refused,
    SubAck,
    VersionRefused,
    WindowFull,
    WireError,
    frame_size,
)
from bridge.mqtt.wireproto import MAX_INCOMING, WireState

QOS1 = mqtt5.QoS.AT_LEAST_ONCE


class Recorder(Batch):
    """A batch that counts how often it was settled (the shell's would resolve a future)."""

    __slots__ = ("settled_count",)

    def __init__(self) -> None:
        super().__init__()
        self.settled_count = 0

    def settled(self) -> None:
        self.settled_count += 1


def sent(state: WireState) -> list[mqtt5.Packet]:
    """Every packet the state queued since the last call, parsed back."""
    data, found, offset = bytes(state.take_out()), [], 0
    while offset < len(data):
        packet, size = mqtt5.read(memoryview(data)[offset:])
        found.append(packet)
        offset += size
    return found


def publishes(state: WireState) -> list[mqtt5.PublishPacket]:
    found = sent(state)
    assert all(isinstance(p, mqtt5.PublishPacket) for p in found)
    return [p for p in found if isinstance(p, mqtt5.PublishPacket)]


def connected(receive_max: int = 3, keepalive: int = 30) -> WireState:
    state = WireState("unit", keepalive=keepalive)
    state.connect()
    state.take_out()
    assert state.receive(mqtt5.ConnAckPacket(receive_max=receive_max).write()) == [Connected()]
    return state


def puback(packet_id: int | None,
           reason_code: mqtt5.PubAckReasonCode = mqtt5.PubAckReasonCode.SUCCESS) -> bytes:
    assert packet_id is not None
    return bytes(mqtt5.PubAckPacket(packet_id, reason_code=reason_code).write())


def test_connect_announces_identity_will_and_limits() -> None:
    state = WireState("gw-1", username="bridge", password="s3cret", keepalive=7,
                      will=("m2m/status", b"offline", 1, True), receive_maximum_hint=70_000)
    state.connect()
    [packet] = sent(state)
    assert isinstance(packet, mqtt5.ConnectPacket)
    assert (packet.client_id, packet.username, packet.password) == ("gw-1", "bridge", b"s3cret")
    assert packet.clean_start
    assert packet.keep_alive == 7
    assert packet.receive_max == 65535  # clamped to what MQTT can say
    assert packet.max_packet_size == MAX_INCOMING
    assert packet.will is not None
    assert (packet.will.topic, packet.will.payload, packet.will.retain) == (
        "m2m/status", b"offline", True)
    assert packet.will.qos == QOS1
    with pytest.raises(ValueError, match="will qos must be 0 or 1"):
        WireState("x", will=("t", b"", 2, False))


def test_connack_accepted_sets_window_limits_and_keepalive() -> None:
    state = WireState("unit", keepalive=30)
    assert not state.connected
    events = state.receive(mqtt5.ConnAckPacket(
        receive_max=20, server_keep_alive=10, max_packet_size=4096, retain_available=False,
        max_qos=mqtt5.QoS.AT_MOST_ONCE,
    ).write())
    assert events == [Connected()]
    assert state.connected
    assert (state.window, state.keepalive, state.max_packet_size) == (20, 10, 4096)
    with pytest.raises(WireError, match="at most QoS 0"):
        state.publish("t", b"", 1, False)
    with pytest.raises(WireError, match="does not accept retained"):
        state.publish("t", b"", 0, True)
    # A second CONNACK breaks the protocol.
    [again] = state.receive(mqtt5.ConnAckPacket().write())
    assert isinstance(again, Failed)
    assert "unexpected CONNACK" in str(again.error)


def test_connack_refused_names_the_reason() -> None:
    state = WireState("unit")
    [event] = state.receive(mqtt5.ConnAckPacket(
        reason_code=mqtt5.ConnAckReasonCode.NOT_AUTHORIZED, reason_str="bad password").write())
    assert isinstance(event, Refused)
    assert str(event.error) == (
        "broker refused the connection: not authorized (135): bad password")
    assert event.error.reason_code == 135
    assert not state.connected


@pytest.mark.parametrize("chunks", [[b"\x20\x02\x00\x01"], [b"\x20", b"\x02\x00", b"\x01"]])
def test_a_3_1_1_connack_says_the_broker_does_not_speak_mqtt_5(chunks: list[bytes]) -> None:
    """What NATS and RabbitMQ 3.x answer an MQTT 5 CONNECT (return code 1), even split across
    reads: a VersionRefused, which `protocol: auto` falls back on, not a malformed packet."""
    state = WireState("unit")
    events = [event for chunk in chunks for event in state.receive(chunk)]
    [event] = events
    assert isinstance(event, Refused)
    assert isinstance(event.error, VersionRefused)
    assert "does not speak MQTT 5" in str(event.error)
    assert "return code 1" in str(event.error)
    assert not state.connected


def test_topics_get_the_aliases_the_broker_allows_and_then_travel_as_aliases() -> None:
    """Topic Alias Maximum 2: the first two topics get aliases 1 and 2, sent with their name
    once and as the alias (empty name) after; a third topic always travels by name."""
    state = WireState("unit")
    state.connect()
    state.take_out()
    state.receive(mqtt5.ConnAckPacket(receive_max=100, topic_alias_max=2).write())
    batch = Recorder()
    topics = ["a/v", "a/i", "a/p", "a/v", "a/p", "a/i"]
    assert state.publish_many([(t, b"1", 1, False) for t in topics[:3]], 0, batch) == 3
    assert state.publish_many([(t, b"1", 0, False) for t in topics[3:]], 0, batch) == 3
    state.publish("a/v", b"2", 1, False)
    sent_ = [(p.topic, p.topic_alias) for p in publishes(state)]
    assert sent_ == [("a/v", 1), ("a/i", 2), ("a/p", None),
                     ("", 1), ("a/p", None), ("", 2), ("", 1)]


def test_no_more_aliases_than_the_receive_maximum() -> None:
    """mosquitto 2.0.11 refuses an alias above its Receive Maximum (max_inflight_messages)
    even when it announced a larger Topic Alias Maximum."""
    state = WireState("unit")
    state.connect()
    state.take_out()
    state.receive(mqtt5.ConnAckPacket(receive_max=2, topic_alias_max=100).write())
    for topic in ("a", "b", "c"):
        state.publish(topic, b"1", 0, False)
    assert [(p.topic, p.topic_alias) for p in publishes(state)] == [
        ("a", 1), ("b", 2), ("c", None)]


def test_no_aliases_when_the_broker_allows_none() -> None:
    state = connected()
    state.publish("a/v", b"1", 1, False)
    state.publish("a/v", b"1", 1, False)
    assert [(p.topic, p.topic_alias) for p in publishes(state)] == [
        ("a/v", None), ("a/v", None)]


def test_window_is_the_brokers_receive_maximum() -> None:
    state = connected(receive_max=3)
    batch = Recorder()
    messages = [(f"t/{i}", b"%d" % i, 1, False) for i in range(5)] + [("t/q0", b"", 0, False)]
    assert state.publish_many(messages, 0, batch) == 3  # the window is full at the 4th
    assert len(state.inflight) == 3
    publishes = sent(state)
    assert [p.topic for p in publishes if isinstance(p, mqtt5.PublishPacket)] == [
        "t/0", "t/1", "t/2"]
    ids = [p.packet_id for p in publishes if isinstance(p, mqtt5.PublishPacket)]
    assert len(set(ids)) == 3
    with pytest.raises(WindowFull):
        state.publish("t/n", b"", 1, False)
    assert state.publish("t/n", b"qos 0 needs no room", 0, False) is None

    assert state.receive(puback(ids[0])) == []  # a batch's ack makes no event
    assert len(state.inflight) == 2
    assert state.publish_many(messages, 3, batch) == 4  # room for one more
    assert state.receive(puback(ids[1]) + puback(ids[2])) == []
    assert state.publish_many(messages, 4, batch) == len(messages)  # the QoS 0 needs no room
    assert len(state.inflight) == 2  # t/3 and t/4
    assert [p.topic for p in sent(state) if isinstance(p, mqtt5.PublishPacket)] == [
        "t/n", "t/3", "t/4", "t/q0"]


def test_pubacks_settle_the_batch_once_and_a_refusal_fails_it() -> None:
    state = connected(receive_max=10)
    batch = Recorder()
    state.publish_many([("a", b"1", 1, False), ("b", b"2", 1, False)], 0, batch)
    first, second = (p.packet_id for p in sent(state) if isinstance(p, mqtt5.PublishPacket))
    batch.settle_one()  # the shell releases the guard once every message is sent
    state.receive(puback(first, reason_code=mqtt5.PubAckReasonCode.NOT_AUTHORIZED))
    assert batch.settled_count == 0  # waits for the whole batch
    assert state.receive(puback(second) + puback(second)) == []  # a duplicate is ignored
    assert batch.settled_count == 1
    assert str(batch.error) == "broker refused a message: not authorized (135)"
    assert batch.error is not None
    assert batch.error.reason_code == 135
    assert not state.inflight


def test_a_publish_nowait_ack_is_an_event() -> None:
    state = connected()
    packet_id = state.publish("cmd/reply", b"ok", 1, False, correlation_data=b"c1")
    [packet] = sent(state)
    assert isinstance(packet, mqtt5.PublishPacket)
    assert (packet.packet_id, packet.correlation_data) == (packet_id, b"c1")
    no_subscribers = mqtt5.PubAckReasonCode.NO_MATCHING_SUBSCRIBERS  # a success code
    assert state.receive(puback(packet_id, reason_code=no_subscribers)) == [
        PubAck(packet_id or 0, 16)]
    assert not state.inflight


def test_a_frame_split_across_two_chunks() -> None:
    state = connected()
    command = mqtt5.PublishPacket("cmd/set", b"42", qos=QOS1, packet_id=7,
                                  response_topic="cmd/reply", correlation_data=b"c1").write()
    ping = mqtt5.PingRespPacket().write()
    assert state.receive(ping + command[:5]) == [PingResp()]
    assert state.receive(command[5:] + ping) == [
        Incoming("cmd/set", b"42", "cmd/reply", b"c1"), PingResp()]
    [ack] = sent(state)  # the incoming QoS 1 is acknowledged
    assert isinstance(ack, mqtt5.PubAckPacket)
    assert ack.packet_id == 7
    # Byte by byte: nothing until the last byte.
    events = [state.receive(command[i : i + 1]) for i in range(len(command))]
    assert events[:-1] == [[]] * (len(command) - 1)
    assert len(events[-1]) == 1


def test_oversized_and_malformed_frames_fail() -> None:
    # A PUBLISH header announcing 200 MB: failed at once, not buffered until it arrives.
    [event] = connected().receive(b"\x30\x80\x80\xc0\x5f")
    assert isinstance(event, Failed)
    assert f"byte packet; we accept {MAX_INCOMING}" in str(event.error)
    [event] = connected().receive(b"\xff\x00")
    assert isinstance(event, Failed)
    assert "malformed packet" in str(event.error)
    # Nothing after a failure in the same chunk is read.
    state = connected()
    events = state.receive(b"\xff\x00" + mqtt5.PingRespPacket().write())
    assert [type(e) for e in events] == [Failed]
    assert frame_size(b"\x30\x80", 0) is None  # the length is not complete yet
    assert frame_size(b"\x30\x02\x00\x05", 0) == 4


def test_broker_disconnect_and_qos2_fail_the_connection() -> None:
    [event] = connected().receive(mqtt5.DisconnectPacket(
        reason_code=mqtt5.DisconnectReasonCode.SESSION_TAKEN_OVER).write())
    assert isinstance(event, Failed)
    assert str(event.error) == "broker disconnected us: session taken over (142)"
    assert event.error.reason_code == 142
    [event] = connected().receive(mqtt5.PublishPacket(
        "t", b"", qos=mqtt5.QoS.EXACTLY_ONCE, packet_id=1).write())
    assert isinstance(event, Failed)
    assert "QoS 2" in str(event.error)


def test_suback_names_every_refused_topic() -> None:
    state = connected()
    packet_id = state.subscribe(["m2m/a/set", "m2m/b/set"], 1)
    [packet] = sent(state)
    assert isinstance(packet, mqtt5.SubscribePacket)
    assert packet.packet_id == packet_id
    codes = [mqtt5.SubAckReasonCode.GRANTED_QOS_AT_LEAST_ONCE,
             mqtt5.SubAckReasonCode.NOT_AUTHORIZED]
    [event] = state.receive(mqtt5.SubAckPacket(packet_id, codes).write())
    assert isinstance(event, SubAck)
    assert event.packet_id == packet_id
    assert str(event.error) == "broker refused the subscription: m2m/b/set: not authorized (135)"
    state.subscribed(packet_id)
    assert state.receive(mqtt5.SubAckPacket(packet_id, codes[:1]).write()) == []  # not ours


def test_packet_ids_wrap_and_skip_those_in_flight() -> None:
    state = connected(receive_max=100)
    state.next_id = 65534
    assert [state.publish("t", b"", 1, False) for _ in range(3)] == [65534, 65535, 1]
    state.next_id = 65534  # both still in flight: skipped
    assert state.publish("t", b"", 1, False) == 2


def test_keepalive_pings_when_idle_and_gives_up_without_pingresp() -> None:
    state = connected(keepalive=10)
    state.last_sent = state.last_received = 100.0
    assert state.tick(105.0) == 5.0  # not idle long enough: nothing sent
    assert sent(state) == []
    assert state.tick(110.0) == 10.0
    assert [type(p) for p in sent(state)] == [mqtt5.PingReqPacket]
    assert state.receive(mqtt5.PingRespPacket().write()) == [PingResp()]
    state.last_received = 110.0
    assert state.tick(120.0) == 10.0  # pings again: still idle
    sent(state)
    assert state.tick(125.0) == 5.0  # the give-up deadline comes first
    gave_up = state.tick(130.0)
    assert isinstance(gave_up, WireError)
    assert str(gave_up) == "no PINGRESP from the broker within 10s"


def test_a_lost_connection_hands_back_the_batches_in_flight() -> None:
    state = connected(receive_max=10)
    batch = Recorder()
    state.publish_many([("a", b"", 1, False), ("b", b"", 1, False)], 0, batch)
    state.publish("c", b"", 1, False)
    assert state.drop_inflight() == {batch}
    assert not state.inflight
    assert not state.connected
