"""Commands: `<prefix>/<device>/<point>/set` -> checked write -> read-back -> result.

The bridge subscribes to `<prefix>/+/+/set` only, so every command reaches the handler and is
answered: one for an unknown device or point, or a read-only one, is refused naming why.
`CommandHandler` receives the publisher's messages, runs each command in a task of its own,
checks and writes it through bridge.core.writes (the link scheduler puts writes first on the bus),
reads the point back, publishes it as a normal reading and answers on `…/set/result` (or the
MQTT 5 response topic, with its correlation data). Payload rules: bridge.core.writes.

Failure policy: a write that fails is reported, never retried (the device may have acted on
it); a write that succeeded but whose read-back failed answers `{"ok": false, "written": true,
"error": …}` so a caller can tell "nothing happened" from "happened, value unknown".
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import structlog

from bridge.core.codec import Value
from bridge.core.messages import Message, Topics
from bridge.core.outbox import Outbox
from bridge.core.planner import ReadRequest
from bridge.core.writes import CommandRefused, clip, parse_command, readback_or_none
from bridge.errors import BridgeError
from bridge.mqtt.wire import Incoming
from bridge.transports.links import modbus_link
from bridge.transports.ports import WritePort
from bridge.transports.writestep import ReadBackFailed, write_point

if TYPE_CHECKING:
    from bridge.config import Config, Device, Point
    from bridge.core.sparkplug import NodeMetrics

log = structlog.get_logger("bridge.mqtt.commands")
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
        link: Callable[[str], WritePort],
        respond: Respond,
        *,
        emit: Callable[[list[Message]], None],
        outboxes: Callable[[str], Outbox | None] | None = None,
        min_interval: float = MIN_INTERVAL,
        metrics: NodeMetrics | None = None,
    ) -> None:
        """`link(name)` and `respond` are looked up per command, not kept: a reload may replace
        the links and the publisher under a running handler. `outboxes(device)` is the running
        poller's Outbox: a read-back published through it counts as that poller's last
        published value, so `report: on-change` does not publish it again. `metrics`: with
        format: sparkplug, the node's (the service's AliasBook numbers them)."""
        self.link = link
        self.respond = respond
        self.emit = emit
        self.min_interval = min_interval
        self.stats = CommandStats()
        self._topics = Topics(config.mqtt.topic_prefix)
        # Sparkplug's DCMD replaces `/set` (bridge.mqtt.sparkplug hands us its writes).
        self._sparkplug = config.mqtt.format == "sparkplug"
        self._prefix = config.mqtt.topic_prefix + "/"
        # Every point of every Modbus device, writable or not, so a command to any of them is
        # answered with the right reason; devices of line links are named so their refusal
        # says why (they have no registers to write).
        # Targets are made per command from these: a _Target and its topic per point would be
        # ~2 MiB at 500 devices x 30 points, for points mostly never written.
        self._modbus: dict[str, Device] = {}
        self._readbacks: dict[tuple[str, str], ReadRequest] = {}  # the writable points'
        self._lines: set[str] = set()
        self._devices: set[str] = set()
        aliases = metrics if self._sparkplug else None
        if self._sparkplug and aliases is None:
            # only then: protobuf is RSS a JSON daemon need not hold
            from bridge.core.sparkplug import NodeMetrics  # noqa: PLC0415 - see above

            aliases = NodeMetrics(config.devices)
        for device in config.devices:
            self._devices.add(device.name)
            if modbus_link(config, device) is None:
                self._lines.add(device.name)
                continue
            self._modbus[device.name] = device
            for point in device.points:
                if (readback := readback_or_none(point)) is not None:
                    self._readbacks[device.name, point.name] = readback
        self._outboxes = outboxes
        # A device's own Outbox for read-backs when no poller lends its own (`outboxes`):
        # built at its first write, as most devices are never written to.
        self._mqtt = config.mqtt
        self._aliases = aliases
        self._fallback: dict[str, Outbox] = {}
        self._last_write: dict[str, float] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def topics(self) -> list[str]:
        """The one subscription: `<prefix>/+/+/set`, never `#`.

        One filter for every point, not one per writable point: a command to a point that is
        unknown or read-only must reach us to be answered, and the filter does not change when
        a reload changes which points are writable (subscriptions change only with a session).
        """
        return [] if self._sparkplug else [self._topics.command("+", "+")]

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
        outcome = await _bounded(self._execute(topic, payload), topic)
        self._count(outcome)
        _audit(topic, shown, outcome.kind, outcome.error)
        await self._answer(topic, outcome, response_topic, correlation_data)

    def _names(self, topic: str) -> tuple[str, str] | None:
        """(device, point) of `<prefix>/<device>/<point>/set`; None for any other topic."""
        rest = topic.removeprefix(self._prefix)
        parts = rest.split("/")
        if rest == topic or len(parts) != 3 or parts[2] != "set":
            return None
        return parts[0], parts[1]

    def _target(self, topic: str) -> _Target | None:
        """The point `topic` names, if a Modbus device has it."""
        names = self._names(topic)
        return None if names is None else self._target_of(*names)

    def _target_of(self, device_name: str, point_name: str) -> _Target | None:
        device = self._modbus.get(device_name)
        if device is None:
            return None
        point = next((p for p in device.points if p.name == point_name), None)
        if point is None:
            return None
        return _Target(device, point, self._readbacks.get((device_name, point_name)))

    async def _execute(self, topic: str, payload: bytes) -> _Outcome:
        target = self._target(topic)
        if target is None:
            return _refused(self._unknown(topic))
        try:
            value = parse_command(target.point, payload)
        except CommandRefused as exc:
            return _refused(exc.reason)
        return await self._write(topic, target, value)

    async def _write(self, topic: str, target: _Target, value: Value) -> _Outcome:
        """A checked value to its point: rate limit, write, read-back (published)."""
        assert target.readback is not None  # the checks refused unwritable points
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

        outbox = (self._outboxes(target.device.name) if self._outboxes else None) or self._outbox(
            target.device)
        self.emit(outbox.readback({target.point.name: read}, time.time_ns() // 1_000_000,
                                  time.monotonic()))
        return _Outcome(True, value=read)

    def _outbox(self, device: Device) -> Outbox:
        """The device's read-back Outbox when no running poller lends one."""
        outbox = self._fallback.get(device.name)
        if outbox is None:
            outbox = self._fallback[device.name] = Outbox(device, self._mqtt)
            if self._aliases is not None:
                outbox.use_metrics(self._aliases.device(device.name))
        return outbox

    # --- Sparkplug DCMD (bridge.mqtt.sparkplug parses and checks; no result topic) ---------

    def write(self, source: str, device: str, point: str, value: Value) -> None:
        """Write `value` (checked already, as a `/set` command's is: a DCMD's metric from
        `source`) to `device`'s `point` in a task, through the same rate limit, write and
        read-back; the outcome is counted and audited, never answered."""
        if len(self._tasks) >= MAX_PENDING:
            self.stats.dropped += 1
            _audit(source, repr(value), "dropped", "too many commands in progress")
            return
        task = asyncio.create_task(self._apply(source, device, point, value),
                                   name=f"command {source}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def refuse(self, source: str, metric: str, reason: str) -> None:
        """A command metric refused before anything was written: counted and audited."""
        self.stats.refused += 1
        _audit(source, metric, "refused", reason)

    async def _apply(self, source: str, device: str, point: str, value: Value) -> None:
        key = self._topics.command(device, point)  # the write's lock, as a /set's
        target = self._target_of(device, point)
        if target is None or target.readback is None:
            outcome = _refused(f"{device}/{point} cannot be written")
        else:
            outcome = await _bounded(self._write(key, target, value), source)
        self._count(outcome)
        _audit(source, f"{point}={value!r}", outcome.kind, outcome.error)

    def _count(self, outcome: _Outcome) -> None:
        if outcome.kind == "ok":
            self.stats.accepted += 1
        elif outcome.kind == "refused":
            self.stats.refused += 1
        else:
            self.stats.failed += 1

    def _unknown(self, topic: str) -> str:
        """Why `topic` names nothing writable: no such device, no such point, or a line."""
        names = self._names(topic)
        if names is None:
            return "not a command topic (<prefix>/<device>/<point>/set)"
        device, point = names
        if device not in self._devices:
            return f"unknown device {device!r}"
        if device in self._lines:
            return f"device {device!r} is a line instrument: it has nothing to write"
        return f"device {device!r} has no point {point!r}"

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
            and not self._is_command(response_topic)
        ):  # answering onto a /set topic would make the result a command
            return response_topic, correlation_data or None
        if topic.endswith("/set"):
            return f"{topic}/result", None
        return None, None  # nothing sensible to answer on; the audit log has it


    def _is_command(self, topic: str) -> bool:
        """Whether `topic` matches our subscription `<prefix>/+/+/set`."""
        parts = topic.removeprefix(self._prefix).split("/")
        return topic.startswith(self._prefix) and len(parts) == 3 and parts[2] == "set"


async def _bounded(work: Coroutine[Any, Any, _Outcome], topic: str) -> _Outcome:
    """`work`'s outcome within HANDLE_TIMEOUT; a timeout or a bug is a failed outcome, never
    an exception: one command must not take the daemon down."""
    try:
        return await asyncio.wait_for(work, HANDLE_TIMEOUT)
    except TimeoutError:
        return _Outcome(False, error=f"no answer within {HANDLE_TIMEOUT:g}s", kind="failed")
    except Exception as exc:
        log.exception("command failed unexpectedly", topic=topic)
        return _Outcome(False, error=f"internal error: {type(exc).__name__}", kind="failed")


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
    audit.info("command", logger="bridge.audit", topic=topic, value=clip(text),
               outcome=outcome, reason=reason or None)
