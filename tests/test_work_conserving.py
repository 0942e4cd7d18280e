"""A work-conserving bus (issue 13, item 0): when the configured polls need more line time than
there is, the line never idles to a grid slot; with slack, the drift-free grid holds.

Nothing sleeps: one loop runs on FakeGrid's clock (time moves only by what it is told), several
on a VirtualClock with a VirtualBus (reads take line time, one at a time through the daemon's
own LinkScheduler). Line time is RTU's at 9600 baud, so 100 registers cost 252 ms, as on the
paced simulator (bench/bus.py measures the real thing).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import pytest
import structlog

from bridge.config import Device, MqttSettings, Point
from bridge.core.bustime import rtu_seconds
from bridge.core.planner import ReadRequest, plan_device
from bridge.device import DeviceStats, poll_on_grid
from bridge.health import Activity
from bridge.poller import DevicePoller
from tests.fakes import FakeGrid, GridDone, VirtualBus, VirtualClock

BAUD = 9600
REGISTERS = 100


def line_time(request: ReadRequest) -> float:
    return rtu_seconds(request, BAUD)


READ = line_time(ReadRequest("holding", 0, REGISTERS, (), None))  # 100 registers: 252 ms


async def grid(
    fake: FakeGrid, interval: float, durations: list[float], *, ok: bool = True,
    failures: Callable[[], int] | None = None,
) -> list[float]:
    """poll_on_grid with polls lasting `durations` (on FakeGrid's clock) in turn; the start of
    each poll, relative to the first."""
    starts: list[float] = []
    origin = fake.now

    async def poll() -> bool:
        starts.append(round(fake.now - origin, 9))
        fake.now += durations[min(len(starts), len(durations)) - 1]
        return ok

    run: Awaitable[None] = poll_on_grid(
        interval, poll, activity=Activity("t", 60.0), stats=DeviceStats(),
        log=structlog.get_logger("test"), failures=failures)
    with pytest.raises(GridDone):
        await run
    return starts


async def test_a_poll_longer_than_its_interval_is_followed_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The issue's case: 252 ms polls every 250 ms. Each poll starts when the last ends (no
    wait at all), where the grid used to leave the line idle until the next 250 ms slot."""
    fake = FakeGrid(monkeypatch, sleeps=20)
    starts = await grid(fake, 0.25, [READ])
    assert round(READ, 3) == 0.252  # 100 registers at 9600 baud
    assert fake.sleeps_taken == [0] * 20
    assert starts == pytest.approx([k * READ for k in range(20)])


async def test_with_slack_the_grid_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    """252 ms polls every 500 ms: each waits for its own tick, exactly on the grid."""
    fake = FakeGrid(monkeypatch, sleeps=10)
    starts = await grid(fake, 0.5, [READ])
    assert fake.sleeps_taken == pytest.approx([0.5 - READ] * 10)
    assert starts == pytest.approx([k * 0.5 for k in range(10)])


async def test_after_an_overload_the_original_grid_comes_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two slow polls run back to back (missed ticks skipped, not queued); once polls fit
    again they land on the grid of the first poll, not on one shifted by the overload."""
    fake = FakeGrid(monkeypatch, sleeps=5)
    starts = await grid(fake, 0.25, [0.6, 0.3, 0.1, 0.1, 0.1, 0.1])
    # 0.6: ticks 1 and 2 passed, one poll at once (tick 2's); 0.9: tick 3's at once; it ends
    # at 1.0, tick 4's time; that one ends at 1.1 and the next waits for tick 5 (1.25).
    assert starts == pytest.approx([0.0, 0.6, 0.9, 1.0, 1.25])
    assert fake.sleeps_taken == pytest.approx([0, 0, 0, 0.15, 0.15])


async def test_a_failing_poll_still_backs_off_when_it_overran(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Back-off is untouched: a failed poll that took longer than its interval (a timeout)
    waits its back-off on the grid instead of retrying at once."""
    fake = FakeGrid(monkeypatch, sleeps=4)
    failures = 0

    def count() -> int:
        nonlocal failures
        failures += 1
        return failures

    starts = await grid(fake, 0.25, [0.3], ok=False, failures=count)
    # after failure n, a wait of 0.25 * 2**(n-1) from the poll's end, then up to the next tick:
    # 0.3 + 0.25 -> 0.75; 1.05 + 0.5 -> 1.75; 2.05 + 1.0 -> 3.25
    assert starts == pytest.approx([0.0, 0.75, 1.75, 3.25])
    assert all(s > 0 for s in fake.sleeps_taken)


# --- several devices on one bus ---------------------------------------------------------------


def meter(unit: int, interval: float) -> Device:
    return Device(name=f"m{unit}", link="bus", unit=unit, interval=interval,
                  points=[Point(name=f"r{a}", address=a) for a in range(REGISTERS)])


async def run_bus(
    clock: VirtualClock, bus: VirtualBus, devices: list[Device], seconds: float
) -> list[DevicePoller]:
    pollers = [
        DevicePoller(d, plan_device(d.points, interval=d.interval), bus, MqttSettings(),
                     emit=lambda _m: None, set_status=lambda _n, _up: None)
        for d in devices
    ]
    tasks = [asyncio.create_task(p.run()) for p in pollers]
    try:
        await clock.run_for(seconds)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return pollers


@pytest.mark.parametrize(("devices", "interval"), [
    (1, 0.25),  # the case: 101% of the line
    (2, 0.3),  # 168%
    (3, 0.5),  # 151%
    (4, 0.33),  # 305%
    (6, 0.5),  # 302%
])
async def test_an_overloaded_bus_never_idles_and_shares_fairly(
    monkeypatch: pytest.MonkeyPatch, devices: int, interval: float
) -> None:
    """More polls than line time: the line is busy all the time (no device waits for a grid
    slot while it is free), and every device gets the same number of reads."""
    clock = VirtualClock(monkeypatch)
    bus = VirtualBus(clock, line_time)
    start = clock.now
    pollers = await run_bus(clock, bus, [meter(u, interval) for u in range(1, devices + 1)], 60)
    assert READ * devices / interval > 1.0  # overloaded
    assert bus.busy(start, clock.now) >= 60 - READ  # idle: at most the last read's remainder
    reads = [p.stats.polls for p in pollers]
    assert max(reads) - min(reads) <= 1, reads
    assert sum(reads) == pytest.approx(60 / READ, abs=devices + 1)


async def test_with_slack_every_device_keeps_its_grid(monkeypatch: pytest.MonkeyPatch) -> None:
    """3 devices every second (76% of the line): each poll starts at its tick, or queued behind
    its neighbours' reads of that tick; none polls more often than its interval."""
    clock = VirtualClock(monkeypatch)
    bus = VirtualBus(clock, line_time)
    start = clock.now
    pollers = await run_bus(clock, bus, [meter(u, 1.0) for u in (1, 2, 3)], 30.9)
    assert [p.stats.polls for p in pollers] == [31, 31, 31]
    for t in bus.transactions:
        offset = (t.start - start) % 1.0
        assert offset == pytest.approx(READ * round(offset / READ), abs=1e-6), t
    assert bus.busy(start, clock.now) == pytest.approx(93 * READ)


async def test_a_neighbour_catching_up_does_not_delay_a_device_with_slack(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """m1 asks for more than the whole line (every 100 ms); m2 wants a read a second. m2 gets
    every one of its reads within one read of its tick, m1 all the rest of the line."""
    clock = VirtualClock(monkeypatch)
    bus = VirtualBus(clock, line_time)
    start = clock.now
    fast, slow = await run_bus(clock, bus, [meter(1, 0.1), meter(2, 1.0)], 30.5)
    assert slow.stats.polls == 31
    for t in bus.transactions:
        if t.unit == 2:
            assert (t.start - start) % 1.0 <= READ + 1e-6, t
    assert bus.busy(start, clock.now) >= 30.5 - READ
    assert fast.stats.polls >= (30.5 - 31 * READ) / READ - 1


async def test_a_dead_device_backs_off_on_an_overloaded_bus(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """3 devices every 500 ms (151%), one of them silent (1 s timeout): it backs off as ever
    (a handful of attempts, not one per turn), the two live ones share the rest of the line."""
    clock = VirtualClock(monkeypatch)
    monkeypatch.setattr("bridge.core.backoff.random.uniform", lambda _lo, hi: hi)
    bus = VirtualBus(clock, line_time)
    bus.silent.add(3)
    start = clock.now
    live1, live2, dead = await run_bus(clock, bus, [meter(u, 0.5) for u in (1, 2, 3)], 60)
    # back-off from 0.5 s doubling to the 60 s cap: attempts at ~0, 1.5, 3.5, 7.5, 15.5, 31.5
    assert dead.stats.polls <= 7, dead.stats
    assert bus.busy(start, clock.now) >= 60 - 1.0
    assert abs(live1.stats.polls - live2.stats.polls) <= 1
    assert live1.stats.polls + live2.stats.polls >= (60 - dead.stats.polls * 1.0) / READ - 2
