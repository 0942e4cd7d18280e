"""Poller: reads one device on its schedule and turns blocks into buffered messages.

Schedules are drift-free: poll k of a group is due at `start + k * interval`, so a slow read
shifts nothing after it. A poll that overran its next tick (a bus with more polls than time)
is followed at once by one for the latest tick passed: the others are skipped, not queued (a
backlog of stale polls helps nobody), and the bus never idles to a grid slot; the link's FIFO
turns keep that fair between its devices (bridge.device.poll_on_grid). A failing device backs
off exponentially with jitter, capped, and on the same tick grid (it never catches up); its
status goes `offline` after `offline_after` failed polls in a row and `online` on the next
success, logged once per change, not once per failure.

Recovery (DESIGN.md "Failure semantics"):
- Exception 02/03 on a read: the request is split (binary, between address clusters) until
  the refused points or the refused gap between two readable halves are found; the rest is
  read and published in the same poll. What was learned is remembered: refused points are
  skipped (logged once) and the group's requests are re-planned so no block covers or
  straddles the refused range. Every `REPROBE_AFTER` seconds it is all forgotten and probed
  again, since firmware updates and reconfigured devices do change their maps. A poll's newly
  refused points are logged in one line; a device that refuses every point fails its polls
  (it answers but serves nothing), so it goes `offline`, and that line is the one about it.
- Exception 05/06 (acknowledge / busy): the device is alive and asks to be asked later. The poll
  backs off like a failed one but does not count towards `offline_after`: the status topic
  says whether the device answers, and a busy device does. Values simply go stale (their `ts`
  shows it) until it has time again.
- No response, a garbled frame, a dead link: a failed poll (back-off, `offline_after`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import structlog

from bridge.core.codec import Table, Value
from bridge.core.messages import Message
from bridge.core.outbox import Outbox
from bridge.core.planner import Barrier, PollGroup, ReadRequest, plan_device, request_for
from bridge.core.scalefactors import LiveScales, normalize_all
from bridge.device import DeviceStats, DeviceStatus, poll_on_grid
from bridge.errors import BridgeError, DeviceError
from bridge.health import Activity
from bridge.transports.ports import PollPort

if TYPE_CHECKING:
    from bridge.config import Device, MqttSettings, Point

log = structlog.get_logger("bridge.poller")

REPROBE_AFTER = 3600.0  # seconds before refused points and ranges are tried again


class DevicePoller:
    """Polls one Modbus device's plan forever; emits messages and status changes."""

    def __init__(
        self,
        device: Device,
        plan: Iterable[PollGroup],
        link: PollPort,
        mqtt: MqttSettings,
        *,
        emit: Callable[[list[Message]], None],
        set_status: Callable[[str, bool], None],
    ) -> None:
        self.device = device
        self.plan = tuple(plan)
        self.link = link
        self.emit = emit
        self.stats = DeviceStats()
        # A poll may take every request's timeout plus the quiet time around it; twice that
        # (and 10 s) before the watchdog calls it hung.
        worst = sum(len(g.requests) for g in self.plan) * (link.timeout + 1.0)
        self.activity = Activity(f"device {device.name}", 10.0 + 2 * worst)
        self._outbox = Outbox(device, mqtt)
        # Devices with no `scale_from` point take the plain loop: nothing extra per value.
        live = LiveScales.of(device.points)
        self._normalize = normalize_all if live is None else live.normalize_all
        self._backoff = 0  # unsuccessful polls in a row (busy ones too), for the back-off
        self._log = log.bind(device=device.name)
        self.status = DeviceStatus(device, set_status, self._outbox, self._log)
        # What the device refuses (exception 02/03), learned at run time.
        self.refused: set[str] = set()  # point names skipped
        self.barriers: set[Barrier] = set()  # ranges no block may cover or straddle
        self._learned_at = 0.0
        self._told: set[str] = set()  # what was already logged: once, not once per re-probe
        self._untold: list[str] = []  # points refused in this poll, told in one line at its end
        # The requests each group (keyed by interval) actually makes, after what was learned.
        self._active: dict[float, tuple[ReadRequest, ...]] = {}

    @property
    def online(self) -> bool:
        return self.status.online

    @property
    def outbox(self) -> Outbox:
        """Where this device's readings become messages (commands publish read-backs here)."""
        return self._outbox

    async def run(self) -> None:
        if len(self.plan) == 1:  # most devices: one interval, no task group to keep per device
            await self._loop(self.plan[0])
            return
        async with asyncio.TaskGroup() as tg:
            for group in self.plan:
                tg.create_task(self._loop(group), name=f"poll {self.device.name}")

    async def _loop(self, group: PollGroup) -> None:
        await poll_on_grid(
            group.interval, lambda: self.poll(group), activity=self.activity, stats=self.stats,
            log=self._log, failures=lambda: self._backoff,
        )

    async def poll(self, group: PollGroup) -> bool:
        """Read every request of `group` once; return whether all succeeded."""
        self.stats.polls += 1
        ts = time.time_ns() // 1_000_000
        now = time.monotonic()
        values: dict[str, Value] = {}
        readings: list[tuple[Point, Value]] = []
        error: BridgeError | None = None
        busy_only = True
        if self._learned_at and now - self._learned_at > REPROBE_AFTER:
            self._forget_refusals()
        for request in self._active.get(group.interval, group.requests):
            try:
                raw = await self._read(request)
            except DeviceError as exc:
                if not exc.refused:
                    error, busy_only = exc, busy_only and exc.busy
                    continue
                raw = []
                try:
                    await self._isolate(group, request, raw)
                except BridgeError as inner:
                    # What was read before the search was cut short is still this poll's.
                    error, busy_only = inner, busy_only and inner.busy
            except BridgeError as exc:
                error, busy_only = exc, False
                if exc.link_down:
                    break  # the link is down: the rest of the cycle would fail the same way
                continue
            readings += raw
            if error is not None and error.link_down:
                break  # the link went down during a refusal search
        # After every request: a value's scale factor may be read by a later one.
        self.stats.bad_values += self._normalize(readings, values)
        # Point names are unique in a device and only its own are refused: all are refused
        # when there are as many (a count, not a set of every device's names: ~1 MiB at 500).
        if self.device.points and len(self.refused) >= len(self.device.points):
            # It answers, but serves nothing: `offline` says so on the status topic and in
            # m2m_device_up, and its offline line is the one line about it.
            self._untold.clear()
            if error is None:
                error, busy_only = DeviceError(
                    f"unit {self.device.unit} refuses every point (exception 02/03); "
                    f"asked again in {REPROBE_AFTER:g}s"), False
        elif self._untold:
            self._log.warning("device refuses points; skipping them",
                              points=self._untold, retry_in=f"{REPROBE_AFTER:g}s")
            self._untold = []
        if values:
            self.emit(self._outbox.messages(values, ts, now))
        if error is None:
            self._backoff = 0
            self.status.succeeded()
            return True
        self._backoff += 1
        self.stats.failed_polls += 1
        if busy_only:
            return False  # alive but busy: retry later, status unchanged
        self.status.failed(str(error))
        return False

    async def _read(self, request: ReadRequest) -> list[tuple[Point, Value]]:
        """One request on the wire: (point, raw value) pairs; failures counted by kind."""
        self.stats.requests += 1
        try:
            words = await self.link.read(self.device.unit, request)
            raw = request.decode(words)
        except BridgeError as exc:
            self.stats.count_failure(exc.failure_kind())
            raise
        self.stats.registers += request.count
        return list(zip(request.points, raw, strict=True))

    async def _isolate(
        self, group: PollGroup, request: ReadRequest, found: list[tuple[Point, Value]]
    ) -> None:
        """`request` was refused (02/03): read what can be read, learn what cannot.

        Splits between clusters of overlapping points (a point is never cut in two). When both
        halves read fine alone, the refusal lies between them: a barrier there. When a single
        cluster is refused, its points are. Anything other than 02/03 ends the search and is
        raised: the device's state is not known well enough to learn from it. What was read
        is in `found`, also when the search ends early.
        """

        async def probe(points: list[Point], first: bool) -> bool:
            if not first:  # the whole request has just been refused: no need to ask again
                try:
                    found.extend(await self._read(request_for(request.table, points)))
                    return True
                except DeviceError as exc:
                    if not exc.refused:
                        raise
            clusters = _clusters(points)
            if len(clusters) == 1:
                self._refuse_points(request.table, points)
                return False
            mid = len(clusters) // 2
            left = [p for c in clusters[:mid] for p in c]
            right = [p for c in clusters[mid:] for p in c]
            left_ok = await probe(left, False)
            right_ok = await probe(right, False)
            if left_ok and right_ok:
                lo = max(_end(p) for p in left)
                hi = min(p.address or 0 for p in right)
                self._add_barrier(Barrier(request.table, lo, hi))
            return False

        try:
            await probe(list(request.points), True)
        finally:
            self._replan(group)  # keep what was learned even if the search was cut short

    def _refuse_points(self, table: Table, points: list[Point]) -> None:
        names = [p.name for p in points]
        self.refused.update(names)
        # Their registers are refused too: no block of their neighbours may cover them.
        start = min(p.address or 0 for p in points)
        self.barriers.add(Barrier(table, start, max(_end(p) for p in points)))
        self._learned_at = self._learned_at or time.monotonic()
        key = "points " + ",".join(names)
        if key not in self._told:
            self._told.add(key)
            self._untold.extend(names)

    def _add_barrier(self, barrier: Barrier) -> None:
        self.barriers.add(barrier)
        self._learned_at = self._learned_at or time.monotonic()
        where = (f"{barrier.table} {barrier.lo}-{barrier.hi - 1}" if barrier.lo < barrier.hi
                 else f"{barrier.table} across {barrier.lo}")
        if where not in self._told:
            self._told.add(where)
            self._log.warning("device refuses reads of a range; reading around it",
                              range=where, retry_in=f"{REPROBE_AFTER:g}s")

    def _replan(self, group: PollGroup) -> None:
        """The group's requests, re-planned around refused points and barriers.

        Only refused requests change shape: their points are re-planned within the span and
        gap the original plan already accepted for them, so no limit is ever exceeded.
        """
        requests: list[ReadRequest] = []
        for request in group.requests:
            touched = any(p.name in self.refused for p in request.points) or any(
                b.table == request.table
                and b.crossed_by(request.address, request.address + request.count)
                for b in self.barriers
            )
            if not touched:
                requests.append(request)
                continue
            keep = [p for p in request.points if p.name not in self.refused]
            for sub in plan_device(
                keep, interval=group.interval, max_registers=request.count,
                max_gap=request.count, max_bits=request.count, barriers=self.barriers,
            ):
                requests.extend(sub.requests)
        self._active[group.interval] = tuple(requests)

    def _forget_refusals(self) -> None:
        self._log.debug("probing refused points and ranges again")
        self.refused.clear()
        self.barriers.clear()
        self._active.clear()
        self._learned_at = 0.0

def _clusters(points: Iterable[Point]) -> list[list[Point]]:
    """Points grouped where their registers overlap (bits of one word, a value and its halves)."""
    out: list[list[Point]] = []
    end = -1
    for point in sorted(points, key=lambda p: (p.address or 0, p.size)):
        start = point.address or 0
        if out and start < end:
            out[-1].append(point)
            end = max(end, _end(point))
        else:
            out.append([point])
            end = _end(point)
    return out


def _end(point: Point) -> int:
    return (point.address or 0) + point.size

