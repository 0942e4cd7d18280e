"""Poller: reads one device on its schedule and turns blocks into buffered messages.

Schedules are drift-free: poll k of a group is due at `start + k * interval`, so a slow read
shifts nothing after it; a tick missed while the bus was busy is skipped, not queued (a backlog
of stale polls helps nobody). A failing device backs off exponentially with jitter, capped,
and on the same tick grid; its status goes `offline` after `offline_after` failed polls in a
row and `online` on the next success, logged once per change, not once per failure.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import structlog

from bridge.codec import Value
from bridge.config import Device, MqttSettings, Point
from bridge.errors import BridgeError, CodecError, DeviceError, TransportError
from bridge.health import Activity
from bridge.messages import Message, Topics, device_payload, point_payload
from bridge.normalize import BadValue, ChangeFilter, engineering
from bridge.planner import PollGroup
from bridge.scheduler import Link

log = structlog.get_logger("bridge.poller")

BACKOFF_CAP = 60.0


@dataclass(slots=True)
class DeviceStats:
    """Counters a user or the metrics endpoint may ask about."""

    polls: int = 0
    failed_polls: int = 0
    requests: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    bad_values: int = 0

    def count_failure(self, kind: str) -> None:
        self.failures[kind] = self.failures.get(kind, 0) + 1


@dataclass(frozen=True, slots=True)
class _Out:
    """Per point, everything publishing needs, computed once."""

    point: Point
    topic: str


class DevicePoller:
    """Polls one Modbus device's plan forever; emits messages and status changes."""

    def __init__(
        self,
        device: Device,
        plan: Iterable[PollGroup],
        link: Link,
        mqtt: MqttSettings,
        *,
        emit: Callable[[list[Message]], None],
        set_status: Callable[[str, bool], None],
    ) -> None:
        self.device = device
        self.plan = tuple(plan)
        self.link = link
        self.emit = emit
        self.set_status = set_status
        self.stats = DeviceStats()
        # A poll may take every request's timeout plus the quiet time around it; twice that
        # (and 10 s) before the watchdog calls it hung.
        worst = sum(len(g.requests) for g in self.plan) * (link.client.endpoint.timeout + 1.0)
        self.activity = Activity(f"device {device.name}", 10.0 + 2 * worst)
        self._qos = mqtt.qos
        self._retain = mqtt.retain
        self._format = mqtt.format
        self._per_device = mqtt.messages == "per-device"
        topics = Topics(mqtt.topic_prefix)
        self._device_topic = topics.device(device.name)
        self._out = {p.name: _Out(p, topics.point(device.name, p.name)) for p in device.points}
        self._changes = ChangeFilter() if device.report == "on-change" else None
        self._failures = 0
        self._online: bool | None = None
        self._log = log.bind(device=device.name)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for group in self.plan:
                tg.create_task(self._loop(group), name=f"poll {self.device.name}")

    async def _loop(self, group: PollGroup) -> None:
        interval = group.interval
        start = time.monotonic()
        tick = 0
        while True:
            delay = 0.0
            try:
                with self.activity.running():
                    ok = await self.poll(group)
            except Exception:  # a bug must cost one poll, not the daemon
                self._log.exception("poll failed unexpectedly")
                self.stats.count_failure("internal")
                ok = False
            if not ok:
                step = min(BACKOFF_CAP, interval * 2 ** (self._failures - 1))
                delay = step * random.uniform(0.5, 1.0)
            # Next tick on the grid that is in the future and at least `delay` away.
            due = time.monotonic() + delay
            tick = max(tick + 1, math.ceil((due - start) / interval))
            await asyncio.sleep(max(0.0, start + tick * interval - time.monotonic()))

    async def poll(self, group: PollGroup) -> bool:
        """Read every request of `group` once; return whether all succeeded."""
        self.stats.polls += 1
        ts = time.time_ns() // 1_000_000
        now = time.monotonic()
        values: dict[str, Value] = {}
        error: BridgeError | None = None
        for request in group.requests:
            self.stats.requests += 1
            try:
                words = await self.link.read(self.device.unit, request)
                raw = request.decode(words)
            except BridgeError as exc:
                error = exc
                self.stats.count_failure(_kind(exc))
                if isinstance(exc, TransportError):
                    break  # the link is down: the rest of the cycle would fail the same way
                continue
            for point, value in zip(request.points, raw, strict=True):
                try:
                    values[point.name] = engineering(point, value)
                except BadValue:
                    self.stats.bad_values += 1
        if values:
            self.emit(self._messages(values, ts, now))
        if error is None:
            self._failures = 0
            self._mark(True, None)
            return True
        self._failures += 1
        self.stats.failed_polls += 1
        self._mark(False, error)
        return False

    def _messages(self, values: dict[str, Value], ts: int, now: float) -> list[Message]:
        if self._changes is not None:
            heartbeat = self.device.heartbeat
            values = {
                name: v
                for name, v in values.items()
                if self._changes.passes(
                    name, v, now, self._out[name].point.deadband, heartbeat
                )
            }
        if not values:
            return []
        if self._per_device:
            payload = device_payload(values, ts)
            return [Message(self._device_topic, payload, self._qos, self._retain, ts)]
        out = self._out
        fmt = self._format
        return [
            Message(out[n].topic, point_payload(v, ts, out[n].point.unit, fmt), self._qos,
                    self._retain, ts)
            for n, v in values.items()
        ]

    def _mark(self, ok: bool, error: BridgeError | None) -> None:
        if ok:
            if self._online is not True:
                self._online = True
                self.set_status(self.device.name, True)
                self._log.info("device online")
            return
        if self._failures >= self.device.offline_after and self._online is not False:
            self._online = False
            self.set_status(self.device.name, False)
            if self._changes is not None:
                for name in self._out:
                    self._changes.forget(name)
            self._log.warning("device offline", error=str(error))


def _kind(exc: BridgeError) -> str:
    if isinstance(exc, DeviceError):
        return f"exception_{exc.code:02d}" if exc.code is not None else "no_response"
    if isinstance(exc, CodecError):
        return "bad_reply"
    return "link"
