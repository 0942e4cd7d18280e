"""What every device loop shares (Modbus pollers and line instruments): its counters, its
drift-free schedule with back-off, and its online/offline status.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog

from bridge.config import Device
from bridge.core.backoff import backoff
from bridge.core.outbox import Outbox
from bridge.health import Activity

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
) -> None:
    """Call `poll` forever on a drift-free grid: poll k is due at start + k * interval.

    A slow poll shifts nothing after it; a tick missed while the bus was busy is skipped, not
    queued. After a failed poll the next one waits min(BACKOFF_CAP, interval * 2^(n-1)) times
    a random 0.5-1.0 (n = `failures()`, None: no back-off), still on the grid.
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
        if not ok and failures is not None:
            delay = backoff(failures(), first=interval, cap=BACKOFF_CAP)
        due = time.monotonic() + delay
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
