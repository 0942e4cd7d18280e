"""CommandHandler and write_point on an in-memory link (tests/fakes.FakeLink).

test_commands.py (a pymodbus slave) and test_write_e2e.py (the daemon, mosquitto) prove writes
end to end; this proves the handler's rules without a socket: a refused command writes
nothing, a good one writes the right words once and publishes the read-back, and a failure is
answered for what it is (not written, or written but not read back), never retried.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bridge.config import Config, load_config
from bridge.core.codec import Field, encode
from bridge.core.messages import Message
from bridge.core.outbox import Outbox
from bridge.core.planner import plan_device
from bridge.mqtt.commands import CommandHandler
from bridge.mqtt.wire import Incoming
from bridge.poller import DevicePoller
from bridge.transports.link import Priority
from bridge.transports.ports import WritePort
from tests.fakes import Call, FakeLink, Fault

UNIT = 3
CONFIG = r"""
version: 1
gateway: {id: cmd}
mqtt: {host: 127.0.0.1, port: 1}
links:
  - {name: plc, type: tcp, host: 127.0.0.1, port: 1502}
  - {name: rs232, type: serial, port: /dev/ttyFAKE0}
devices:
  - name: dev
    link: plc
    unit: 3
    points:
      - {name: setpoint, address: 0, type: float32, writable: true, unit: V}
      - {name: level, address: 2}
      - {name: alarm, address: 3, type: bool, bit: 1}
      - {name: temp, address: 10, type: int16, scale: 0.1, min: 5, max: 30, writable: true}
      - {name: mode, address: 11, values: {0: stopped, 1: running, 2: fault}, writable: true}
      - {name: pump, table: coil, address: 4, writable: true}
  - name: onc
    link: plc
    unit: 4
    interval: 1s
    report: on-change
    points:
      - {name: setpoint, address: 0, writable: true}
      - {name: ticker, address: 1}
  - name: scale
    link: rs232
    request: "SI\r\n"
    response: '(?P<weight>\d+)'
    points: [{name: weight, type: float32}]
"""


@pytest.fixture
def config(tmp_path: Path) -> Config:
    path = tmp_path / "bridge.yaml"
    path.write_text(CONFIG)
    return load_config(path)


class Harness:
    """A handler on a FakeLink: replies and published readings collected."""

    def __init__(self, config: Config, links: dict[str, WritePort] | None = None,
                 **kwargs: Any) -> None:
        self.link = FakeLink()
        self.replies: list[tuple[str, dict[str, Any], bytes | None]] = []
        self.readings: list[Message] = []
        ports = {"plc": self.link} if links is None else links
        self.handler = CommandHandler(config, ports.__getitem__, self._respond,
                                      emit=self.readings.extend, **kwargs)

    async def _respond(self, topic: str, payload: bytes, correlation: bytes | None) -> bool:
        self.replies.append((topic, json.loads(payload), correlation))
        return True

    async def send(self, topic: str, payload: bytes | str, response_topic: str | None = None,
                   correlation: bytes | None = None, *, retain: bool = False) -> None:
        data = payload.encode() if isinstance(payload, str) else payload
        self.handler.on_message(Incoming(topic, data, response_topic, correlation, retain))
        await self.handler.drain(5)

    def reply(self) -> dict[str, Any]:
        """The one result sent so far."""
        ((_, body, _),) = self.replies
        return body

    def published(self) -> dict[str, Any]:
        return {m.topic: json.loads(m.payload)["value"] for m in self.readings}


@pytest.fixture
def h(config: Config) -> Harness:
    return Harness(config)


# --- good writes -----------------------------------------------------------------------------


async def test_a_write_puts_the_words_on_the_wire_then_reads_back_and_publishes(
    h: Harness,
) -> None:
    """float32 12.25: one FC16 of the codec's two words to unit 3, then a read-back of exactly
    those registers ahead of polls (READ_BACK), published like a poll and answered."""
    await h.send("m2m/cmd/dev/setpoint/set", "12.25")
    words = tuple(encode(Field(0, "float32"), 12.25))
    assert h.link.calls == [
        Call("write", UNIT, "holding", 0, 2, words),
        Call("read", UNIT, "holding", 0, 2, priority=Priority.READ_BACK),
    ]
    assert h.replies == [("m2m/cmd/dev/setpoint/set/result", {"ok": True, "value": 12.25}, None)]
    (reading,) = h.readings
    assert reading.topic == "m2m/cmd/dev/setpoint"
    assert json.loads(reading.payload) | {"ts": 0} == {"value": 12.25, "unit": "V", "ts": 0}
    assert h.handler.stats.accepted == 1


@pytest.mark.parametrize(
    ("point", "payload", "written", "answered"),
    [
        ("temp", "21.5", ("holding", 10, (215,)), 21.5),  # scale 0.1 inverted
        ("temp", '{"value": 5}', ("holding", 10, (50,)), 5),
        ("mode", "running", ("holding", 11, (1,)), "running"),  # enum name -> code -> name
        ("mode", "2", ("holding", 11, (2,)), "fault"),
        ("pump", "on", ("coil", 4, (1,)), True),  # FC5
        ("pump", "false", ("coil", 4, (0,)), False),
    ],
)
async def test_values_are_written_raw_and_answered_in_engineering_terms(
    h: Harness, point: str, payload: str, written: tuple[str, int, tuple[int, ...]],
    answered: object,
) -> None:
    await h.send(f"m2m/cmd/dev/{point}/set", payload)
    assert h.link.writes() == [written]
    assert h.reply() == {"ok": True, "value": answered}
    assert h.published() == {f"m2m/cmd/dev/{point}": answered}


async def test_the_mqtt5_response_topic_gets_the_result_with_its_correlation_data(
    h: Harness,
) -> None:
    await h.send("m2m/cmd/dev/temp/set", "20", "app/replies", b"\x01\x02")
    assert h.replies == [("app/replies", {"ok": True, "value": 20}, b"\x01\x02")]


# --- refusals: nothing reaches the link ------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "payload", "error"),
    [
        ("m2m/cmd/dev/temp/set", "31", "31 is above max 30"),
        ("m2m/cmd/dev/temp/set", "4.9", "4.9 is below min 5"),
        ("m2m/cmd/dev/temp/set", "21.55", "does not fall on a int16 register step"),
        ("m2m/cmd/dev/setpoint/set", "fast", "payload is not JSON or a value: 'fast'"),
        ("m2m/cmd/dev/setpoint/set", "true", "expected a number for float32, got true"),
        ("m2m/cmd/dev/setpoint/set", '{"value": 1, "ts": 5}', "expected {\"value\": …}"),
        ("m2m/cmd/dev/mode/set", "7", "7 is not one of stopped (0), running (1), fault (2)"),
        ("m2m/cmd/dev/pump/set", "2", "expected true/false"),
        ("m2m/cmd/dev/level/set", "5", "point 'level' is read-only (writable is not set)"),
        ("m2m/cmd/dev/alarm/set", "true", "point 'alarm' is read-only"),
        ("m2m/cmd/nosuch/x/set", "5", "unknown device 'nosuch'"),
        ("m2m/cmd/dev/nosuch/set", "5", "device 'dev' has no point 'nosuch'"),
        ("m2m/cmd/scale/weight/set", "5",
         "device 'scale' is a line instrument: it has nothing to write"),
    ],
)
async def test_a_refused_command_writes_nothing_and_says_why(
    h: Harness, topic: str, payload: str, error: str
) -> None:
    await h.send(topic, payload)
    body = h.reply()
    assert body["ok"] is False
    assert error in body["error"]
    assert "written" not in body
    assert h.link.calls == []
    assert h.readings == []
    assert h.handler.stats.refused == 1
    assert h.replies[0][0] == f"{topic}/result"


async def test_a_retained_command_is_ignored_without_a_write(h: Harness) -> None:
    """A retained /set is a stale command the broker replays to every session."""
    await h.send("m2m/cmd/dev/temp/set", "20", retain=True)
    assert h.replies == []
    assert h.link.calls == []
    assert h.handler.stats.refused == 1


async def test_a_second_write_to_a_point_within_the_interval_is_refused(config: Config) -> None:
    h = Harness(config, min_interval=3600)  # the second command always falls inside it
    await h.send("m2m/cmd/dev/temp/set", "20")
    await h.send("m2m/cmd/dev/temp/set", "21")
    await h.send("m2m/cmd/dev/mode/set", "stopped")  # another point has its own interval
    assert [body["ok"] for _, body, _ in h.replies] == [True, False, True]
    assert h.replies[1][1]["error"] == "rate limit: one write per 3600s on this point"
    assert h.link.writes() == [("holding", 10, (200,)), ("holding", 11, (0,))]


# --- failures: answered for what they are, never retried --------------------------------------


@pytest.mark.parametrize("fault", ["refuse", "busy", "silent", "down"])
async def test_a_failed_write_is_answered_and_neither_retried_nor_read_back(
    h: Harness, fault: Fault
) -> None:
    h.link.then(UNIT, fault)
    await h.send("m2m/cmd/dev/temp/set", "20")
    body = h.reply()
    assert body["ok"] is False
    assert body["error"].startswith("write failed: ")
    assert "written" not in body
    assert [c.op for c in h.link.calls] == ["write"]  # once, and no read-back
    assert h.link.get(UNIT, "holding", 10) == [0]
    assert h.readings == []
    assert h.handler.stats.failed == 1


@pytest.mark.parametrize("fault", ["silent", "busy", "down"])
async def test_a_failed_read_back_says_the_value_was_written(h: Harness, fault: Fault) -> None:
    """`written: true`: the caller can tell "happened, value unknown" from "nothing happened"."""
    h.link.then(UNIT, "ok", fault)
    await h.send("m2m/cmd/dev/temp/set", "20")
    body = h.reply()
    assert body == {"ok": False, "written": True, "error": body["error"]}
    assert body["error"].startswith("written, but the read-back failed: ")
    assert h.link.get(UNIT, "holding", 10) == [200]
    assert [c.op for c in h.link.calls] == ["write", "read"]
    assert h.readings == []
    assert h.handler.stats.failed == 1


async def test_the_read_back_publishes_what_the_device_kept(h: Harness) -> None:
    """A device that acknowledges a write but keeps its own value (it clamps, or the point is
    locally overridden): the answer and the reading are the device's value, not the asked."""
    h.link.pin(UNIT, "holding", 10, 250)
    await h.send("m2m/cmd/dev/temp/set", "20")
    assert h.link.writes() == [("holding", 10, (200,))]
    assert h.reply() == {"ok": True, "value": 25}
    assert h.published() == {"m2m/cmd/dev/temp": 25}


async def test_a_read_back_that_is_not_a_number_is_a_read_back_failure(h: Harness) -> None:
    """The write went through, but what the device holds is a NaN: no reading is published
    and the answer says the value was written."""
    h.link.pin(UNIT, "holding", 0, *encode(Field(0, "float32"), float("nan")))
    await h.send("m2m/cmd/dev/setpoint/set", "2.5")
    body = h.reply()
    assert body["ok"] is False
    assert body["written"] is True
    assert body["error"].startswith("written, but the read-back failed: ")
    assert h.readings == []


async def test_a_link_that_is_not_running_is_a_failure_without_io(config: Config) -> None:
    h = Harness(config, links={})
    await h.send("m2m/cmd/dev/temp/set", "20")
    assert h.reply() == {"ok": False, "error": "link 'plc' is not running"}
    assert h.handler.stats.failed == 1


# --- the read-back and the poller's on-change --------------------------------------------------


async def test_on_change_does_not_publish_a_read_back_value_again(config: Config) -> None:
    """The read-back goes out through the running poller's Outbox: with `report: on-change`
    it is the last published value, so the next poll, reading the same, publishes nothing for
    it (and still publishes a neighbour that changed)."""
    device = next(d for d in config.devices if d.name == "onc")
    polled: list[Message] = []
    link = FakeLink()
    poller = DevicePoller(device, plan_device(device.points, interval=device.interval), link,
                          config.mqtt, emit=polled.extend, set_status=lambda *_: None)
    outboxes: dict[str, Outbox] = {"onc": poller.outbox}
    h = Harness(config, links={"plc": link}, outboxes=outboxes.get)
    (group,) = poller.plan

    link.set(4, "holding", 0, 100, 7)
    await poller.poll(group)
    assert [m.topic for m in polled] == ["m2m/cmd/onc/setpoint", "m2m/cmd/onc/ticker"]
    polled.clear()

    await h.send("m2m/cmd/onc/setpoint/set", "42")
    assert h.published() == {"m2m/cmd/onc/setpoint": 42}
    link.set(4, "holding", 1, 8)
    await poller.poll(group)
    assert [(m.topic, json.loads(m.payload)["value"]) for m in polled] == [
        ("m2m/cmd/onc/ticker", 8)]
