"""What every device loop shares (Modbus pollers and line instruments): its counters, its
drift-free schedule with back-off, and its online/offline status.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog

from bridge.core.backoff import backoff
from bridge.core.outbox import Outbox
from bridge.health import Activity

if TYPE_CHECKING:
    from bridge.config import Device

BACKOFF_CAP = 60.0


@dataclass(slots=True)
class DeviceStats:
    """Counters a user or the metrics endpoint may ask about."""

    polls: int = 0
    failed_polls: int = 0
    requests: int = 0
    registers: int = 0  # registers (or bits) read, holes included
    failures: dict[str, int] = field(default_factory=dict)
    bad_values: int = 0

    def count_failure(self, kind: str) -> None:
        self.failures[kind] = self.failures.get(kind, 0) + 1


async def poll_on_grid(
    interval: float,
    poll: Callable[[], Awaitable[bool]],
    *,
    activity: Activity,
    stats: DeviceStats,
    log: structlog.typing.FilteringBoundLogger,
    failures: Callable[[], int] | None,
    work_conserving: bool = True,
) -> None:
    """Call `poll` forever on a drift-free grid: poll k is due at start + k * interval.

    A slow poll shifts nothing after it. With slack (a poll ends before the next tick) the
    next poll waits for that tick. A successful poll that overran its next tick (the bus was
    busy, or the poll itself takes longer than the interval) is work-conserving: the next poll
    starts at once, for the latest tick passed (the others are skipped, not queued), so a bus
    whose polls exceed its capacity never idles to a grid slot. Fairness between the devices
    of one link is the link's: a poll asks for its turn behind those already waiting
    (bridge.transports.link). `work_conserving=False` keeps the grid even then (a streaming
    instrument's polls cost no line time and wait for a line to arrive).

    After a failed poll the next one waits min(BACKOFF_CAP, interval * 2^(n-1)) times a
    random 0.5-1.0 (n = `failures()`, None: no back-off), still on the grid: a failing device
    never catches up, so it cannot hog the line.
    """
    start = time.monotonic()
    tick = 0
    while True:
        delay = 0.0
        try:
            with activity.running():
                ok = await poll()
        except Exception:  # a bug must cost one poll, not the daemon
            log.exception("poll failed unexpectedly")
            stats.count_failure("internal")
            ok = False
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            # A cancel that something below swallowed (Python 3.11's wait_for drops one that
            # lands with its result): stop now, or the poller outlives the daemon's stop.
            raise asyncio.CancelledError
        now = time.monotonic()
        if ok and work_conserving and now >= start + (tick + 1) * interval:
            tick = math.floor((now - start) / interval)  # overran: poll again at once
            await asyncio.sleep(0)  # no wait; only a turn for the other tasks
            continue
        if not ok and failures is not None:
            delay = backoff(failures(), first=interval, cap=BACKOFF_CAP)
        due = now + delay
        tick = max(tick + 1, math.ceil((due - start) / interval))
        await asyncio.sleep(max(0.0, start + tick * interval - time.monotonic()))


class DeviceStatus:
    """A device's `online`/`offline`: offline after `offline_after` failed polls in a row,
    online again at the next success; each change is published and logged once."""

    def __init__(
        self,
        device: Device,
        publish: Callable[[str, bool], None],
        outbox: Outbox,
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        self.device = device
        self.publish = publish
        self.outbox = outbox
        self.log = log
        self.failures = 0  # failed polls in a row, towards offline_after
        self._online: bool | None = None

    @property
    def online(self) -> bool:
        return self._online is True

    def succeeded(self) -> None:
        self.failures = 0
        if self._online is not True:
            self._online = True
            self.publish(self.device.name, True)
            self.log.info("device online")

    def failed(self, reason: str) -> None:
        self.failures += 1
        if self.failures >= self.device.offline_after and self._online is not False:
            self._online = False
            self.publish(self.device.name, False)
            self.outbox.forget()  # on-change: publish every point again when it comes back
            self.log.warning("device offline", error=reason)
