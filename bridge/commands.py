"""Commands: `<prefix>/<device>/<point>/set` -> checked write -> read-back -> result.

Two halves, as everywhere in the bridge:

- **Pure**: `parse_command` turns a payload into a checked engineering value, and `plan_write`
  turns that value into the one Modbus request that writes it. Every check runs before
  anything reaches the wire; every refusal is a `CommandRefused` with a one-line reason.
- **Edge**: `CommandHandler` receives the publisher's messages, runs each command in a task of
  its own, writes through the link scheduler (writes go first on the bus), reads the point
  back, publishes it as a normal reading and answers on `…/set/result` (or the MQTT 5 response
  topic, with its correlation data). `write_point` is the shared write + read-back step the
  `write` CLI uses too.

Payloads (DESIGN.md "MQTT contract"): a JSON value (`42.5`, `true`, `"running"`), an object
`{"value": …}` (no other keys: a reading or a result echoed back to a `/set` topic must not
turn into a write), or bare text where JSON would need quotes: an enum name (`running`),
`on`/`off`/`true`/`false` in any case for bool points (what Home Assistant switches send),
and the text itself for string points. A payload that is valid JSON is always read as JSON,
so a string point given `123` is refused: quote it (`"123"`).

Bool points also take 0 and 1; enum points take a name or a code of their `values` map.
`min`/`max` are in engineering units and checked before scale/offset are inverted.

Failure policy: a write that fails is reported, never retried (the device may have acted on
it); a write that succeeded but whose read-back failed answers `{"ok": false, "written": true,
"error": …}` so a caller can tell "nothing happened" from "happened, value unknown".
"""

from __future__ import annotations

import asyncio
import decimal
import json
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import structlog

from bridge.codec import BIT_TABLES, Field, Value, encode
from bridge.config import Config, Device, Point, SerialLink, TcpLink
from bridge.errors import BridgeError, CodecError
from bridge.messages import Message, Topics
from bridge.normalize import BadValue, engineering
from bridge.planner import ReadRequest, plan_device
from bridge.poller import Outbox
from bridge.scheduler import Link, Priority
from bridge.wire import Incoming

log = structlog.get_logger("bridge.commands")
audit = structlog.get_logger("bridge.audit")

# One write per point per second: a PLC setpoint is not a stream, a UI slider can emit dozens
# of updates a second, and many devices keep holding registers in EEPROM that wears per write.
MIN_INTERVAL = 1.0
# Commands being handled at once, all points together; past this a flood is dropped (counted,
# logged, not answered) instead of growing tasks and result publishes without bound.
MAX_PENDING = 256
# Read-back and results must not wait forever on a wedged link; writes go first on the bus, so
# this only ever covers the write, its read-back and one transaction already on the wire.
HANDLE_TIMEOUT = 30.0
# Raw values of integer registers may be this far from whole after inverting scale/offset
# (21.5 / 0.1 is 214.99999999999997 in binary floating point) and still be rounded.
_WHOLE_TOLERANCE = 1e-6
_SHOWN_PAYLOAD = 60  # characters of a payload quoted in reasons and the audit log
_ON = frozenset({"true", "on"})
_OFF = frozenset({"false", "off"})


class CommandRefused(BridgeError):
    """A command that was not written: the one-line `reason` says why."""

    def __init__(self, reason: str) -> None:
        self.reason = " ".join(reason.split())  # one line, whatever went into it
        super().__init__(self.reason)


# --- pure: payload -> checked value -> Modbus request -----------------------------------------


def parse_command(point: Point, payload: bytes) -> Value:
    """The checked engineering value `payload` asks `point` to take; CommandRefused if not.

    Enum values come back as their name, bool points as a bool. Nothing here does I/O, so a
    refused command provably reaches no device.
    """
    _check_writable(point)  # first, so a read-only point says so whatever the payload
    return check_value(point, _decode(point, payload))


def check_value(point: Point, value: Value) -> Value:
    """`value` checked for `point` (type, enum, min/max, scale, register fit), canonicalised."""
    _check_writable(point)
    if _is_bool(point):
        value = _as_bool(value)
    elif point.values is not None:
        value = _as_enum(point.values, value)
    elif point.type == "string":
        if not isinstance(value, str):
            raise CommandRefused(f"expected a string for a string point, got {_show(value)} "
                                 f"(quote it to send it as text)")
    elif isinstance(value, bool) or not isinstance(value, int | float):
        raise CommandRefused(f"expected a number for {point.type}, got {_show(value)}")
    _check_limits(point, value)
    plan_write(point, value)  # scale inversion and register fit, refused here if impossible
    return value


@dataclass(frozen=True, slots=True)
class WriteOp:
    """One Modbus write request: FC5 for a coil, FC6 for one register, FC16 for more."""

    kind: Literal["coil", "registers"]
    address: int
    value: bool | tuple[int, ...]

    @property
    def function_code(self) -> int:
        if isinstance(self.value, bool):
            return 5
        return 6 if len(self.value) == 1 else 16


def plan_write(point: Point, value: Value) -> WriteOp:
    """The request that writes engineering `value` to `point`, in the point's byte order.

    A coil is always one FC5 (a point is one bit, so FC15 never applies); a register value is
    one request, so a 32/64-bit value is never torn across two writes.
    """
    _check_writable(point)
    assert point.address is not None  # _check_writable refuses points without one
    if point.table in BIT_TABLES:
        return WriteOp("coil", point.address, _as_bool(value))
    raw = _raw(point, value)
    try:
        words = encode(Field(0, point.type, point.order, None, point.count), raw)
    except CodecError as exc:
        shown = "" if raw == value else f"{_show(value)} is raw {_show(raw)}: "
        raise CommandRefused(f"{shown}{exc}") from None
    return WriteOp("registers", point.address, tuple(words))


def _check_writable(point: Point) -> None:
    if not point.writable:
        raise CommandRefused(f"point {point.name!r} is read-only (writable is not set)")
    if point.address is None:
        raise CommandRefused(f"point {point.name!r} has no register address to write")
    # Writable single bits are refused by config validation (read-modify-write is not atomic).


def _decode(point: Point, payload: bytes) -> Value:
    """The value in a payload: JSON, `{"value": …}`, or bare text (see the module docstring)."""
    try:
        text = payload.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CommandRefused("payload is not UTF-8 text") from None
    if not text:
        raise CommandRefused("payload is empty")
    try:
        # parse_constant: NaN and Infinity are no JSON and no register value.
        found: Any = json.loads(text, parse_constant=_no_constant)
    except CommandRefused:
        raise
    except (ValueError, RecursionError):
        return _bare(point, text)
    if isinstance(found, dict):
        if set(found) != {"value"}:
            keys = ", ".join(repr(k) for k in list(found)[:5]) or "none"
            raise CommandRefused(f'expected {{"value": …}}, got an object with keys {keys}')
        found = found["value"]
    if found is None or isinstance(found, list | dict):
        raise CommandRefused(f"{_show_json(found)} is not a value")
    if isinstance(found, float) and not math.isfinite(found):
        raise CommandRefused(f"{found} is not a finite number")
    value: Value = found
    return value


def _no_constant(name: str) -> Any:
    raise CommandRefused(f"{name} is not a finite number")


def _bare(point: Point, text: str) -> Value:
    """Unquoted text: an enum name, on/off for bools, the text for strings; nothing else."""
    if _is_bool(point) and text.lower() in _ON | _OFF:
        return text.lower() in _ON
    if point.values is not None or point.type == "string":
        return text
    raise CommandRefused(f"payload is not JSON or a value: {_clip(text)!r}")


def _is_bool(point: Point) -> bool:
    return point.table in BIT_TABLES or point.type == "bool"


def _as_bool(value: Value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in _ON | _OFF:
        return value.lower() in _ON
    raise CommandRefused(f"expected true/false (or on/off, 1/0) for a bool point, "
                         f"got {_show(value)}")


def _as_enum(values: Mapping[int, str], value: Value) -> str:
    """The enum name `value` (a name or a code) stands for."""
    if isinstance(value, str):
        if value in values.values():
            return value
    elif not isinstance(value, bool) and isinstance(value, int | float) and value in values:
        return values[int(value)]
    listed = ", ".join(f"{name} ({code})" for code, name in values.items())
    raise CommandRefused(f"{_show(value)} is not one of {listed}")


def _enum_code(values: Mapping[int, str], name: str) -> int:
    return next(code for code, known in values.items() if known == name)


def _check_limits(point: Point, value: Value) -> None:
    if isinstance(value, bool | str):
        if point.values is None or not isinstance(value, str):
            return
        number: float = _enum_code(point.values, value)  # min/max of an enum bound its codes
    else:
        number = value
    if point.min is not None and number < point.min:
        raise CommandRefused(f"{_show(value)} is below min {_show(point.min)}")
    if point.max is not None and number > point.max:
        raise CommandRefused(f"{_show(value)} is above max {_show(point.max)}")


def _raw(point: Point, value: Value) -> Value:
    """The register value for engineering `value`: raw = (value - offset) / scale."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, str):
        return _enum_code(point.values, value) if point.values is not None else value
    if point.scale == 1 and point.offset == 0:
        return value  # exact: a float detour would round 64-bit integers
    if point.scale == 0:
        raise CommandRefused(f"point {point.name!r} has scale 0: no raw value gives {value}")
    if point.type in ("float32", "float64"):
        return (value - point.offset) / point.scale
    # Decimal on the shortest repr of each number: 21.5 at scale 0.1 is exactly raw 215,
    # where binary floating point says 214.99999999999997.
    with decimal.localcontext(prec=60):
        exact = (_dec(value) - _dec(point.offset)) / _dec(point.scale)
        whole = exact.to_integral_value(rounding=decimal.ROUND_HALF_EVEN)
        if abs(exact - whole) > decimal.Decimal(_WHOLE_TOLERANCE):
            raise CommandRefused(
                f"{_show(value)} does not fall on a {point.type} register step (scale "
                f"{_show(point.scale)}, offset {_show(point.offset)}: raw {exact.normalize()})"
            )
    return int(whole)


def _dec(number: int | float) -> decimal.Decimal:
    return decimal.Decimal(number if isinstance(number, int) else repr(number))


def _show(value: Value | float) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    if isinstance(value, str):
        return repr(_clip(value))
    return _clip(str(value))


def _show_json(value: Any) -> str:
    if value is None:
        return "null"
    return "a list" if isinstance(value, list) else "an object"


def _clip(text: str) -> str:
    return text if len(text) <= _SHOWN_PAYLOAD else text[: _SHOWN_PAYLOAD - 1] + "…"


# --- edge: the write itself -------------------------------------------------------------------


def readback_request(point: Point) -> ReadRequest:
    """The one read that fetches `point` alone (no coalescing: only this point matters)."""
    groups = plan_device([point], interval=1.0)
    return groups[0].requests[0]


async def write_point(
    link: Link, unit: int, point: Point, value: Value, readback: ReadRequest | None = None
) -> Value:
    """Write checked `value` to `point` (once, never retried), read it back, return that.

    DeviceError / TransportError from the write propagate as they are; a failure of the
    read-back is raised as ReadBackFailed, so callers know the write itself went through.
    """
    op = plan_write(point, value)
    if isinstance(op.value, bool):
        await link.write_coil(unit, op.address, op.value)
    else:
        await link.write_registers(unit, op.address, op.value)
    request = readback if readback is not None else readback_request(point)
    try:
        words = await link.read(unit, request, priority=Priority.READ_BACK)
        return engineering(point, request.decode(words)[0])
    except (BridgeError, BadValue) as exc:
        raise ReadBackFailed(f"written, but the read-back failed: {exc}") from None


class ReadBackFailed(BridgeError):
    """The write was acknowledged by the device, but reading the point back failed."""


# --- edge: MQTT commands ----------------------------------------------------------------------


# Publisher.respond: an immediate, unbuffered reply (False when no broker is connected).
# Arguments: topic, payload, the MQTT 5 correlation data to echo (or None).
Respond: TypeAlias = Callable[[str, bytes, bytes | None], Awaitable[bool]]


@dataclass(slots=True)
class CommandStats:
    """Counters per outcome: accepted (written), refused (nothing written), failed."""

    accepted: int = 0
    refused: int = 0
    failed: int = 0
    dropped: int = 0  # over MAX_PENDING: not even answered


@dataclass(frozen=True, slots=True)
class _Target:
    """A point commands may address, with everything handling needs, computed once."""

    device: Device
    point: Point
    readback: ReadRequest | None  # None: the point cannot be written (refused before I/O)
    outbox: Outbox  # the device's: read-backs are published exactly as its polls are


@dataclass(frozen=True, slots=True)
class _Outcome:
    ok: bool
    value: Value | None = None
    error: str = ""
    written: bool = False
    kind: Literal["ok", "refused", "failed"] = "ok"


class CommandHandler:
    """Receives `/set` messages, writes the points, publishes read-backs and results."""

    def __init__(
        self,
        config: Config,
        link: Callable[[str], Link],
        respond: Respond,
        *,
        emit: Callable[[list[Message]], None],
        min_interval: float = MIN_INTERVAL,
    ) -> None:
        """`link(name)` and `respond` are looked up per command, not kept: a reload may replace
        the links and the publisher under a running handler."""
        self.link = link
        self.respond = respond
        self.emit = emit
        self.min_interval = min_interval
        self.stats = CommandStats()
        self._topics = Topics(config.mqtt.topic_prefix)
        self._targets: dict[str, _Target] = {}
        for device in config.devices:
            if not isinstance(config.link(device.link), TcpLink | SerialLink):
                continue  # line instruments have nothing to write
            outbox = Outbox(device, config.mqtt)
            for point in device.points:
                self._targets[self._topics.command(device.name, point.name)] = _Target(
                    device, point, _readback_or_none(point), outbox
                )
        self._last_write: dict[str, float] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def topics(self) -> list[str]:
        """The exact `/set` topics of writable points: the only subscriptions (never `#`)."""
        return [topic for topic, t in self._targets.items() if t.point.writable]

    def on_message(self, message: Incoming) -> None:
        """Publisher hook: start handling `message`; never raises, whatever it carries."""
        try:
            topic = message.topic
            if message.retain:
                # A retained /set is a stale command the broker replays to every new session;
                # acting on it at each reconnect would repeat a write nobody asked for now.
                self.stats.refused += 1
                _audit(topic, message.payload, "refused", "retained command ignored")
                return
            if len(self._tasks) >= MAX_PENDING:
                self.stats.dropped += 1
                _audit(topic, message.payload, "dropped", "too many commands in progress")
                return
            task = asyncio.create_task(
                self.handle(topic, message.payload, message.response_topic,
                            message.correlation_data),
                name=f"command {topic}",
            )
        except Exception:  # a bug here must cost one command, not the receive loop
            log.exception("command could not be started")
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self, timeout: float) -> None:  # noqa: ASYNC109 - a grace period, then cancel
        """Let commands in progress finish (their results go out) for at most `timeout` s."""
        if self._tasks:
            _, late = await asyncio.wait(set(self._tasks), timeout=timeout)
            for task in late:
                task.cancel()

    async def handle(
        self,
        topic: str,
        payload: bytes,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
    ) -> None:
        """One command from receipt to result; every outcome is answered and audited."""
        shown = payload.decode("utf-8", "replace")
        try:
            outcome = await asyncio.wait_for(self._execute(topic, payload), HANDLE_TIMEOUT)
        except TimeoutError:
            outcome = _Outcome(False, error=f"no answer within {HANDLE_TIMEOUT:g}s",
                               kind="failed")
        except Exception as exc:  # never let one command take the daemon down
            log.exception("command failed unexpectedly", topic=topic)
            outcome = _Outcome(False, error=f"internal error: {type(exc).__name__}",
                               kind="failed")
        if outcome.kind == "ok":
            self.stats.accepted += 1
        elif outcome.kind == "refused":
            self.stats.refused += 1
        else:
            self.stats.failed += 1
        _audit(topic, shown, outcome.kind, outcome.error)
        await self._answer(topic, outcome, response_topic, correlation_data)

    async def _execute(self, topic: str, payload: bytes) -> _Outcome:
        target = self._targets.get(topic)
        if target is None:
            return _refused("unknown device or point, or the point is not writable")
        try:
            value = parse_command(target.point, payload)
        except CommandRefused as exc:
            return _refused(exc.reason)
        assert target.readback is not None  # parse_command refused unwritable points
        now = time.monotonic()
        last = self._last_write.get(topic)
        if last is not None and now - last < self.min_interval:
            return _refused(f"rate limit: one write per {self.min_interval:g}s on this point")
        self._last_write[topic] = now
        try:
            link = self.link(target.device.link)
        except KeyError:
            return _Outcome(False, error=f"link {target.device.link!r} is not running",
                            kind="failed")
        async with self._locks.setdefault(topic, asyncio.Lock()):
            try:
                read = await write_point(
                    link, target.device.unit, target.point, value, target.readback
                )
            except ReadBackFailed as exc:
                return _Outcome(False, error=str(exc), written=True, kind="failed")
            except BridgeError as exc:
                return _Outcome(False, error=f"write failed: {exc}", kind="failed")

        self.emit(target.outbox.build({target.point.name: read}, time.time_ns() // 1_000_000))
        return _Outcome(True, value=read)

    async def _answer(
        self,
        topic: str,
        outcome: _Outcome,
        response_topic: str | None,
        correlation_data: bytes | None,
    ) -> None:
        body: dict[str, Any] = {"ok": outcome.ok}
        if outcome.ok:
            body["value"] = outcome.value
        else:
            if outcome.written:
                body["written"] = True
            body["error"] = outcome.error
        reply = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        where, correlation = self._reply_to(topic, response_topic, correlation_data)
        if where is None:
            return
        try:
            sent = await self.respond(where, reply, correlation)
        except Exception:  # a bad response topic the broker or paho rejects: log, go on
            log.warning("command result not sent", topic=where, exc_info=True)
            return
        if not sent:
            log.warning("command result not sent: broker not connected", topic=where)

    def _reply_to(
        self, topic: str, response_topic: str | None, correlation_data: bytes | None
    ) -> tuple[str | None, bytes | None]:
        """MQTT 5 response topic (with correlation data) if usable, else `<topic>/result`."""
        if (
            response_topic is not None
            and _publishable(response_topic)
            and response_topic not in self._targets
        ):  # answering onto a /set topic would make the result a command
            return response_topic, correlation_data or None
        if topic.endswith("/set"):
            return f"{topic}/result", None
        return None, None  # nothing sensible to answer on; the audit log has it


def _readback_or_none(point: Point) -> ReadRequest | None:
    try:
        _check_writable(point)
    except CommandRefused:
        return None
    return readback_request(point)


def _publishable(topic: str) -> bool:
    return (
        0 < len(topic.encode("utf-8", "replace")) <= 65535
        and not any(c in topic for c in "+#\x00")
    )


def _refused(reason: str) -> _Outcome:
    return _Outcome(False, error=reason, kind="refused")


def _audit(topic: str, payload: str | bytes, outcome: str, reason: str) -> None:
    """One line per command. The payload is a command value, never a credential."""
    text = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else payload
    # The log setup renders no logger names, so the line names its own, for filtering. (Not
    # bound at import: binding before logs.configure would fix the default output, stdout.)
    audit.info("command", logger="bridge.audit", topic=topic, value=_clip(text),
               outcome=outcome, reason=reason or None)
