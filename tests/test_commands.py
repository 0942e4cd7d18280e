"""Commands: payload parsing and checks, write planning, and the handler against a real slave."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.config import Config, Point, load_config
from bridge.core.codec import BYTE_ORDERS, Field, PointType, Value, encode
from bridge.core.messages import Message
from bridge.core.writes import CommandRefused, WriteOp, check_value, parse_command, plan_write
from bridge.mqtt.commands import CommandHandler
from bridge.mqtt.wire import Incoming
from bridge.sim.tcp import Simulator
from bridge.transports.link import Link
from bridge.transports.modbus import Endpoint, ModbusClient
from tests.helpers import examples, free_port, simulated

NUMERIC_TYPES: tuple[PointType, ...] = (
    "int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64"
)


def point(**fields: Any) -> Point:
    return Point.model_validate({"name": "p", "address": 10, "writable": True} | fields)


SETPOINT = point(type="int16", scale=0.1, min=5, max=30)
MODE = point(values={0: "stopped", 1: "running", 2: "fault"})
COIL = point(table="coil")
FLAG = point(type="bool")
LABEL = point(type="string", count=4)
FLOAT = point(type="float32")
BIG = point(type="uint64")
POINTS = (SETPOINT, MODE, COIL, FLAG, LABEL, FLOAT, BIG, point(), point(writable=False),
          point(type="uint16", bit=3, writable=False),
          point(type="int32", offset=-40, scale=0.5))


def refused(p: Point, payload: bytes | str) -> str:
    with pytest.raises(CommandRefused) as info:
        parse_command(p, payload.encode() if isinstance(payload, str) else payload)
    reason = info.value.reason
    assert "\n" not in reason
    return reason


class TestPayloadForms:
    """Every accepted way of writing a value."""

    @pytest.mark.parametrize(
        ("p", "payload", "value"),
        [
            (FLOAT, "42.5", 42.5),
            (FLOAT, ' {"value": 42.5} ', 42.5),
            (FLOAT, "-3", -3),
            (BIG, str(2**64 - 1), 2**64 - 1),
            (SETPOINT, "21.5", 21.5),
            (MODE, '"running"', "running"),
            (MODE, "running", "running"),
            (MODE, "2", "fault"),
            (MODE, '{"value": "stopped"}', "stopped"),
            (COIL, "true", True),
            (COIL, "false", False),
            (COIL, "ON", True),
            (COIL, "off", False),
            (COIL, "1", True),
            (COIL, '{"value": 0}', False),
            (FLAG, '"on"', True),
            (LABEL, '"AB-12"', "AB-12"),
            (LABEL, "hello", "hello"),
            (LABEL, '"123"', "123"),
        ],
    )
    def test_accepted(self, p: Point, payload: str, value: Value) -> None:
        """The payload yields the checked engineering value (enum codes become names)."""
        got = parse_command(p, payload.encode())
        assert got == value
        assert type(got) is type(value)


class TestRefusals:
    """Each problem is refused before any I/O, with a one-line reason naming it."""

    @pytest.mark.parametrize(
        ("p", "payload", "reason"),
        [
            (point(writable=False), "1", "point 'p' is read-only"),
            (point(type="uint16", bit=3, writable=False), "1", "point 'p' is read-only"),
            (point(address=None), "1", "has no register address"),
            (FLOAT, b"\xff\xfe", "payload is not UTF-8 text"),
            (FLOAT, "   ", "payload is empty"),
            (FLOAT, "fast", "payload is not JSON or a value: 'fast'"),
            (FLOAT, '{"value": 1, "ts": 5}', "expected {\"value\": …}, got an object with keys"),
            (FLOAT, "{}", "keys none"),
            (FLOAT, "null", "null is not a value"),
            (FLOAT, "[1, 2]", "a list is not a value"),
            (FLOAT, '{"value": {"value": 1}}', "an object is not a value"),
            (FLOAT, "NaN", "NaN is not a finite number"),
            (FLOAT, "-Infinity", "-Infinity is not a finite number"),
            (FLOAT, "1e999", "inf is not a finite number"),
            (FLOAT, "true", "expected a number for float32, got true"),
            (FLOAT, '"42.5"', "expected a number for float32, got '42.5'"),
            (FLOAT, "1e39", "outside the float32 range"),
            (LABEL, "123", "expected a string for a string point, got 123"),
            (LABEL, '"much too long"', "longer than 8 characters"),
            (LABEL, '"naïve €"', "outside Latin-1"),
            (MODE, "fast", "'fast' is not one of stopped (0), running (1), fault (2)"),
            (MODE, "7", "7 is not one of stopped (0)"),
            (MODE, "true", "true is not one of"),
            (MODE, "1.5", "1.5 is not one of"),
            (COIL, "2", "expected true/false (or on/off, 1/0) for a bool point, got 2"),
            (COIL, "maybe", "payload is not JSON or a value: 'maybe'"),
            (SETPOINT, "31", "31 is above max 30"),
            (SETPOINT, "4.9", "4.9 is below min 5"),
            (SETPOINT, "21.55", "21.55 does not fall on a int16 register step"),
            (point(type="uint16", scale=10), "700000", "700000 is raw 70000: 70000 is outside"),
            (point(type="uint16"), "-1", "-1 is outside the uint16 range 0..65535"),
            (point(type="int16"), "1.5", "1.5 is not a whole number"),
            (point(type="int16", scale=0), "1", "scale 0"),
            (point(values={0: "a"}, min=1), "a", "'a' is below min 1"),
        ],
    )
    def test_refused(self, p: Point, payload: bytes | str, reason: str) -> None:
        """The reason says what is wrong."""
        assert reason in refused(p, payload)

    def test_long_payloads_are_clipped_in_reasons(self) -> None:
        """A megabyte of junk does not become a megabyte of log line."""
        assert len(refused(FLOAT, "x" * 1_000_000)) < 120

    @given(payload=st.binary(max_size=200), index=st.integers(0, len(POINTS) - 1))
    @settings(max_examples=examples(600), deadline=None)
    def test_arbitrary_bytes_raise_nothing_but_refusals(self, payload: bytes, index: int) -> None:
        """Whatever arrives, the answer is a value or CommandRefused, never a crash."""
        with contextlib.suppress(CommandRefused):
            parse_command(POINTS[index], payload)

    @given(value=st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                      max_size=3),
        max_leaves=8,
    ), index=st.integers(0, len(POINTS) - 1), wrap=st.booleans())
    @settings(max_examples=examples(600), deadline=None)
    def test_arbitrary_json_raises_nothing_but_refusals(
        self, value: Any, index: int, wrap: bool
    ) -> None:
        """Every JSON shape (bare or as {"value": …}) is a value or a refusal."""
        body = json.dumps({"value": value} if wrap else value)
        with contextlib.suppress(CommandRefused):
            parse_command(POINTS[index], body.encode())


class TestPlanWrite:
    """The request chosen for each point, and the words it carries."""

    def test_coil_is_fc5(self) -> None:
        assert plan_write(COIL, True) == WriteOp("coil", 10, True)
        assert plan_write(COIL, True).function_code == 5

    def test_one_register_is_fc6_and_wider_values_fc16(self) -> None:
        assert plan_write(point(type="int16"), -2).function_code == 6
        assert plan_write(FLAG, True) == WriteOp("registers", 10, (1,))
        assert plan_write(FLOAT, 1.0).function_code == 16
        assert plan_write(BIG, 1).function_code == 16
        assert plan_write(LABEL, "AB").value == (0x4142, 0, 0, 0)

    @pytest.mark.parametrize("type_", NUMERIC_TYPES)
    @pytest.mark.parametrize("order", BYTE_ORDERS)
    def test_every_type_and_byte_order_matches_the_codec(self, type_: PointType, order: str
                                                         ) -> None:
        """One request, in the point's byte order, with exactly codec.encode's words."""
        p = point(type=type_, byte_order=order)
        value: Value = {"int16": -1234, "uint16": 60000, "int32": -(2**31),
                        "uint32": 2**32 - 1, "int64": -(2**63), "uint64": 2**64 - 1,
                        "float32": 1.5, "float64": -2.25e100}[type_]
        op = plan_write(p, check_value(p, value))
        assert op.value == tuple(encode(Field(0, type_, p.order), value))
        assert op.address == 10

    @pytest.mark.parametrize(
        ("p", "value", "raw"),
        [
            (SETPOINT, 21.5, 215),
            (SETPOINT, 5, 50),
            (point(type="int32", offset=-40, scale=0.5), -10, 60),
            (point(type="uint16", scale=0.01), 655.35, 65535),
            (point(type="float32", scale=2, offset=1), 7.0, 3.0),
            (MODE, "fault", 2),
        ],
    )
    def test_scale_and_offset_are_inverted(self, p: Point, value: Value, raw: Value) -> None:
        """raw = (value - offset) / scale, whole for integer registers."""
        assert plan_write(p, value).value == tuple(encode(Field(0, p.type, p.order), raw))

    def test_64_bit_integers_stay_exact(self) -> None:
        """No float detour: 2**64 - 1 is written as itself."""
        assert plan_write(BIG, 2**64 - 1).value == (0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF)


# --- the handler against a real pymodbus slave -----------------------------------------------

CONFIG = """\
version: 1
gateway: {{id: cmd}}
mqtt: {{host: 127.0.0.1, port: 1}}
links:
  - {{name: plc, type: tcp, host: 127.0.0.1, port: {port}, timeout: 300ms}}
devices:
  - name: dev
    link: plc
    points:
      - {{name: setpoint, address: 0, type: float32, writable: true, unit: V}}
      - {{name: level, address: 2}}
      - {{name: alarm, address: 3, type: bool, bit: 1}}
"""


class Harness:
    """A handler wired to a real slave, with replies and readings collected."""

    def __init__(self, config: Config, link: Link) -> None:
        self.replies: list[tuple[str, Any, bytes | None]] = []
        self.readings: list[Message] = []
        self.handler = CommandHandler(
            config, {"plc": link}.__getitem__, self._respond, emit=self.readings.extend
        )

    async def _respond(self, topic: str, payload: bytes, correlation: bytes | None) -> bool:
        self.replies.append((topic, json.loads(payload), correlation))
        return True

    async def send(
        self,
        topic: str,
        payload: bytes,
        response_topic: str | None = None,
        correlation: bytes | None = None,
        *,
        retain: bool = False,
    ) -> None:
        self.handler.on_message(Incoming(topic, payload, response_topic, correlation, retain))
        await self.handler.drain(5)


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[tuple[Simulator, Harness]]:
    path = tmp_path / "bridge.yaml"
    path.write_text(CONFIG.format(port=free_port()))
    config = load_config(path)
    link_config = config.links[0]
    assert link_config.type == "tcp"
    async with simulated(config) as sim:
        link = Link(ModbusClient(Endpoint("tcp", "127.0.0.1", link_config.port, 0.5)))
        try:
            yield sim, Harness(config, link)
        finally:
            link.close()


class TestHandler:
    """Routing, results, read-back, refusal without I/O."""

    @pytest.mark.integration
    async def test_subscribes_to_every_command_topic_with_one_filter(
        self, rig: tuple[Simulator, Harness]
    ) -> None:
        """One `<prefix>/+/+/set`, never `#`: commands to any point reach us to be answered."""
        _, h = rig
        assert h.handler.topics() == ["m2m/cmd/+/+/set"]

    @pytest.mark.integration
    async def test_write_reads_back_publishes_and_answers(
        self, rig: tuple[Simulator, Harness]
    ) -> None:
        sim, h = rig
        await h.send("m2m/cmd/dev/setpoint/set", b"12.25")
        assert h.replies == [("m2m/cmd/dev/setpoint/set/result", {"ok": True, "value": 12.25},
                              None)]
        assert sim.registers("dev", "holding", 0, 2) == encode(Field(0, "float32"), 12.25)
        (reading,) = h.readings
        assert reading.topic == "m2m/cmd/dev/setpoint"
        assert json.loads(reading.payload) | {"ts": 0} == {"value": 12.25, "ts": 0, "unit": "V"}
        assert h.handler.stats.accepted == 1

    @pytest.mark.integration
    async def test_read_only_and_unknown_targets_are_refused_naming_why_without_a_write(
        self, rig: tuple[Simulator, Harness]
    ) -> None:
        sim, h = rig
        await h.send("m2m/cmd/dev/level/set", b"5")
        await h.send("m2m/cmd/nosuch/x/set", b"5")
        await h.send("m2m/cmd/dev/nosuch/set", b"5")
        await h.send("m2m/cmd/dev/alarm/set", b"true")
        await h.send("m2m/cmd/dev/level", b"5")  # not a /set topic: nothing to answer on
        assert [(topic, body["ok"], body["error"]) for topic, body, _ in h.replies] == [
            ("m2m/cmd/dev/level/set/result", False,
             "point 'level' is read-only (writable is not set)"),
            ("m2m/cmd/nosuch/x/set/result", False, "unknown device 'nosuch'"),
            ("m2m/cmd/dev/nosuch/set/result", False, "device 'dev' has no point 'nosuch'"),
            ("m2m/cmd/dev/alarm/set/result", False,
             "point 'alarm' is read-only (writable is not set)"),
        ]
        assert sim.write_requests("dev") == 0
        assert h.handler.stats.refused == 5

    @pytest.mark.integration
    async def test_response_topic_and_correlation_data_are_honoured(
        self, rig: tuple[Simulator, Harness]
    ) -> None:
        _, h = rig
        await h.send("m2m/cmd/dev/setpoint/set", b"1", "app/replies", b"\x01\x02")
        assert h.replies[0] == ("app/replies", {"ok": True, "value": 1}, b"\x01\x02")

    @pytest.mark.integration
    async def test_a_response_topic_that_is_a_command_topic_is_not_used(
        self, rig: tuple[Simulator, Harness]
    ) -> None:
        """Answering onto a /set topic would turn the result into a command."""
        _, h = rig
        await h.send("m2m/cmd/dev/alarm/set", b"1", "m2m/cmd/dev/setpoint/set")
        assert h.replies[0][0] == "m2m/cmd/dev/alarm/set/result"

    @pytest.mark.integration
    async def test_a_retained_command_is_ignored_without_a_write(
        self, rig: tuple[Simulator, Harness]
    ) -> None:
        """A retained /set is a stale command replayed by the broker: never written."""
        sim, h = rig
        await h.send("m2m/cmd/dev/setpoint/set", b"7", retain=True)
        assert h.replies == []
        assert sim.write_requests("dev") == 0
        assert h.handler.stats.refused == 1

    async def test_a_failed_write_is_reported_and_not_retried(self, tmp_path: Path) -> None:
        """A dead device: one attempt, a failure result, no read-back reading."""
        path = tmp_path / "bridge.yaml"
        path.write_text(CONFIG.format(port=free_port()))
        config = load_config(path)
        link = Link(ModbusClient(Endpoint("tcp", "127.0.0.1", free_port(), 0.3)))
        h = Harness(config, link)
        await h.send("m2m/cmd/dev/setpoint/set", b"3")
        link.close()
        (_, body, _), = h.replies
        assert body["ok"] is False
        assert body["error"].startswith("write failed:")
        assert "written" not in body
        assert h.readings == []
        assert h.handler.stats.failed == 1
        assert link.scheduler.transactions == 1

    @pytest.mark.parametrize(
        ("mqtt", "topic", "payload"),
        [
            ("format: value", "m2m/cmd/dev/setpoint", b"7.5"),
            ("messages: per-device", "m2m/cmd/dev", None),
        ],
    )
    @pytest.mark.integration
    async def test_read_back_uses_the_configured_message_form(
        self, rig: tuple[Simulator, Harness], tmp_path: Path, mqtt: str, topic: str,
        payload: bytes | None,
    ) -> None:
        """The read-back looks exactly like the poller's readings would."""
        sim, _ = rig
        (host, port), = sim.endpoints
        path = tmp_path / "other.yaml"
        path.write_text(CONFIG.format(port=port).replace("port: 1}", f"port: 1, {mqtt}}}"))
        link = Link(ModbusClient(Endpoint("tcp", host, port, 0.5)))
        h = Harness(load_config(path), link)
        await h.send("m2m/cmd/dev/setpoint/set", b"7.5")
        link.close()
        (reading,) = h.readings
        assert reading.topic == topic
        if payload is not None:
            assert reading.payload == payload
        else:
            assert json.loads(reading.payload)["values"] == {"setpoint": 7.5}
