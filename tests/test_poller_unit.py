"""DevicePoller's rules on an in-memory link (tests/fakes.FakeLink): no socket, no waiting.

What test_recovery.py and test_serial.py show against real slaves on ptys, shown here per rule:
refusal learning (split, skip, barriers, re-probe), busy versus offline, offline counting, the
back-off between polls, which failures end a cycle, and on-change reporting. Each test drives
`poller.poll(group)` itself; where time matters (re-probe, heartbeat, the poll grid) the
modules' clocks are replaced, so nothing sleeps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest
import structlog

import bridge.poller
from bridge.config import Device, MqttSettings, Point
from bridge.core.codec import Value
from bridge.core.messages import Message
from bridge.core.planner import Barrier, PollGroup, plan_device
from bridge.poller import REPROBE_AFTER, DevicePoller
from tests.fakes import FakeGrid, FakeLink, GridDone

PREFIX = "m2m/t"
UNIT = 1


def device(addresses: list[int], **extra: Any) -> Device:
    """Device `m` on unit 1: holding register `a` is point `r<a>`; polled every second."""
    fields: dict[str, Any] = {"name": "m", "link": "bus", "unit": UNIT, "interval": 1.0,
                              "points": [Point(name=f"r{a}", address=a) for a in addresses]}
    return Device(**(fields | extra))


@dataclass
class Rig:
    """A poller on a FakeLink whose unit 1 holds 100 + a in holding register a."""

    link: FakeLink
    poller: DevicePoller
    messages: list[Message]
    statuses: list[bool]  # each status published, in order (True: online)

    @property
    def group(self) -> PollGroup:
        (group,) = self.poller.plan
        return group

    async def poll(self) -> dict[str, Value]:
        """One poll; the point values it published."""
        before = len(self.messages)
        await self.poller.poll(self.group)
        return {m.topic.rsplit("/", 1)[1]: json.loads(m.payload)["value"]
                for m in self.messages[before:]}


def rig(dev: Device, *, max_gap: int = 30) -> Rig:
    link = FakeLink()
    for a in range(200):
        link.set(UNIT, "holding", a, 100 + a)
    messages: list[Message] = []
    statuses: list[bool] = []
    poller = DevicePoller(
        dev, plan_device(dev.points, interval=dev.interval, max_gap=max_gap), link,
        MqttSettings(topic_prefix=PREFIX), emit=messages.extend,
        set_status=lambda _name, up: statuses.append(up),
    )
    return Rig(link, poller, messages, statuses)


class Clock:
    """Stands in for the `time` module of bridge.poller: monotonic time moves when told."""

    def __init__(self) -> None:
        self.now = 10_000.0

    def monotonic(self) -> float:
        return self.now

    def time_ns(self) -> int:
        return int(self.now * 1e9)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(bridge.poller, "time", fake)
    return fake


HOLE = range(10, 20)  # what the device refuses in these tests (exception 02)


# --- refusal learning (exception 02/03) --------------------------------------------------------


async def test_a_refused_block_is_split_and_everything_around_the_hole_published() -> None:
    """One block 0-26 across a hole at 10-19: the same poll reads around it and publishes every
    point; the hole is learned as a barrier and the next poll sends nothing that covers it."""
    r = rig(device([0, 1, 5, 25, 26]))
    r.link.refuse(UNIT, "holding", HOLE)
    assert r.group.requests[0].count == 27  # one coalesced read across the hole

    assert await r.poll() == {"r0": 100, "r1": 101, "r5": 105, "r25": 125, "r26": 126}
    assert r.link.reads() == [
        ("holding", 0, 27),  # refused
        ("holding", 0, 2), ("holding", 5, 22),  # halves: the right one still spans the hole
        ("holding", 5, 1), ("holding", 25, 2),  # ... and its halves read: the hole is between
    ]
    assert r.poller.barriers == {Barrier("holding", 6, 25)}
    assert r.poller.refused == set()

    r.link.calls.clear()
    assert await r.poll() == {"r0": 100, "r1": 101, "r5": 105, "r25": 125, "r26": 126}
    assert r.link.reads() == [("holding", 0, 6), ("holding", 25, 2)]
    assert r.statuses == [True]
    assert r.poller.stats.failed_polls == 0


async def test_a_refused_point_is_skipped_and_told_once() -> None:
    """A point inside the hole is refused itself: skipped from then on, named in one warning
    (not one per poll), and its neighbours keep publishing."""
    with structlog.testing.capture_logs() as logs:
        r = rig(device([0, 5, 15, 25]))
        r.link.refuse(UNIT, "holding", HOLE)
        assert await r.poll() == {"r0": 100, "r5": 105, "r25": 125}
        for _ in range(3):
            assert await r.poll() == {"r0": 100, "r5": 105, "r25": 125}
    assert r.poller.refused == {"r15"}
    assert not any(15 in range(a, a + n) for _, a, n in r.link.reads()[-2:])
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert [(e["event"], e["points"]) for e in warnings] == [
        ("device refuses points; skipping them", ["r15"])]
    assert r.statuses == [True]


async def test_a_read_refused_across_a_page_boundary_is_read_in_two() -> None:
    """A device that cannot read across address 50: both sides are served, so the block is
    cut there and no point is lost."""
    r = rig(device([48, 49, 50, 51]))
    r.link.refuse_across(UNIT, "holding", 50)
    assert await r.poll() == {"r48": 148, "r49": 149, "r50": 150, "r51": 151}
    assert r.poller.barriers == {Barrier("holding", 50, 50)}
    r.link.calls.clear()
    await r.poll()
    assert r.link.reads() == [("holding", 48, 2), ("holding", 50, 2)]


async def test_a_device_refusing_every_point_goes_offline_in_one_line() -> None:
    """It answers, but serves nothing: the poll fails, the status goes offline, and the
    offline line is the only one about it (no list of refused points)."""
    with structlog.testing.capture_logs() as logs:
        r = rig(device([0, 1], offline_after=1))
        r.link.refuse(UNIT, "holding", range(100))
        assert await r.poll() == {}
    assert r.statuses == [False]
    assert r.poller.refused == {"r0", "r1"}
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert [e["event"] for e in warnings] == ["device offline"]
    assert "refuses every point" in warnings[0]["error"]


async def test_refusals_are_probed_again_after_REPROBE_AFTER(clock: Clock) -> None:
    """What was learned holds for REPROBE_AFTER seconds; then the original plan is tried again,
    so a device whose map was fixed (a firmware update) is read in one block again."""
    r = rig(device([0, 1, 5, 25, 26]))
    r.link.refuse(UNIT, "holding", HOLE)
    await r.poll()
    r.link.refused.clear()  # the device serves the range from now on

    clock.now += REPROBE_AFTER - 1
    r.link.calls.clear()
    await r.poll()
    assert r.link.reads() == [("holding", 0, 6), ("holding", 25, 2)]  # still reading around it

    clock.now += 2
    r.link.calls.clear()
    assert await r.poll() == {"r0": 100, "r1": 101, "r5": 105, "r25": 125, "r26": 126}
    assert r.link.reads() == [("holding", 0, 27)]
    assert r.poller.barriers == set()


async def test_a_device_still_refusing_after_the_reprobe_is_learned_again(clock: Clock) -> None:
    r = rig(device([0, 15, 25]))
    r.link.refuse(UNIT, "holding", HOLE)
    await r.poll()
    clock.now += REPROBE_AFTER + 1
    r.link.calls.clear()
    assert await r.poll() == {"r0": 100, "r25": 125}
    assert r.link.reads()[0] == ("holding", 0, 26)  # the original block, asked again
    assert r.poller.refused == {"r15"}
    r.link.calls.clear()
    await r.poll()
    assert r.link.reads() == [("holding", 0, 1), ("holding", 25, 1)]


def split_cut_short_by_busy() -> Rig:
    """Block 0-25 refused; the search reads r0, learns r15, then r25 answers busy."""
    r = rig(device([0, 15, 25], offline_after=1))
    r.link.refuse(UNIT, "holding", HOLE)
    # (0,26) refused, (0,1) read, (15,11) refused, (15,1) refused, (25,1) busy.
    r.link.then(UNIT, "ok", "ok", "ok", "ok", "busy")
    return r


async def test_a_busy_answer_while_splitting_ends_the_search_and_keeps_what_was_learned() -> None:
    """Exception 06 in the middle of the search ends it (nothing more is learned from a device
    that is not answering plainly) and fails the poll; what was learned before it stays, so
    the next poll already reads around the refused point."""
    r = split_cut_short_by_busy()
    assert await r.poll() == {"r0": 100}  # read during the search, so published this poll
    assert r.poller.stats.failed_polls == 1
    assert r.poller.stats.failures == {"exception_02": 3, "exception_06": 1}
    assert r.poller.refused == {"r15"}
    r.link.calls.clear()
    assert await r.poll() == {"r0": 100, "r25": 125}
    assert r.link.reads() == [("holding", 0, 1), ("holding", 25, 1)]


async def test_a_busy_answer_while_splitting_does_not_count_towards_offline() -> None:
    """errors.py: busy (05/06) keeps the device online, wherever in a poll it comes."""
    r = split_cut_short_by_busy()
    await r.poll()
    assert r.statuses == []


# --- busy, offline, back-off ---------------------------------------------------------------------


async def test_busy_retries_later_without_going_offline() -> None:
    """Exception 06 fails the poll (values go stale) but never counts towards offline."""
    r = rig(device([0], offline_after=2))
    assert await r.poll() == {"r0": 100}
    r.link.busy.add(UNIT)
    for _ in range(5):
        assert await r.poll() == {}
    assert r.statuses == [True]
    assert r.poller.online
    assert r.poller.stats.failures == {"exception_06": 5}
    assert r.poller.stats.failed_polls == 5
    r.link.busy.clear()
    assert await r.poll() == {"r0": 100}
    assert r.statuses == [True]


async def test_offline_after_n_failed_polls_and_online_after_one_success() -> None:
    """`offline_after: 3`: two silent polls change nothing, the third publishes offline once;
    one good poll publishes online and the values."""
    r = rig(device([0], offline_after=3))
    assert await r.poll() == {"r0": 100}
    r.link.silent.add(UNIT)
    for _ in range(2):
        await r.poll()
    assert r.statuses == [True]
    for _ in range(3):
        await r.poll()
    assert r.statuses == [True, False]  # once, not once per failure
    assert r.poller.stats.failures == {"no_response": 5}
    r.link.silent.clear()
    assert await r.poll() == {"r0": 100}
    assert r.statuses == [True, False, True]


async def test_a_failure_between_successes_starts_the_count_again() -> None:
    r = rig(device([0], offline_after=2))
    r.link.then(UNIT, "silent", "ok", "silent", "ok", "silent")
    for _ in range(5):
        await r.poll()
    assert r.statuses == [True]


async def run_until_done(poller: DevicePoller) -> None:
    # A device with one interval runs its loop directly; one with several, in a task group.
    with pytest.RaisesGroup(GridDone, allow_unwrapped=True):
        await poller.run()


async def test_back_off_doubles_per_failed_poll_and_resets_after_a_success(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Polls every 1 s; a silent unit is asked again after 1, 2, 4, 8 s (interval x 2^(n-1),
    on the grid); the first good poll brings the next one back to 1 s."""
    grid = FakeGrid(monkeypatch, sleeps=7)
    r = rig(device([0], offline_after=10))
    r.link.then(UNIT, "silent", "silent", "silent", "silent", "ok", "ok", "silent")
    await run_until_done(r.poller)
    assert grid.sleeps_taken == [1, 2, 4, 8, 1, 1, 1]
    assert len(r.link.reads()) == 7


async def test_back_off_is_capped_at_60_s(monkeypatch: pytest.MonkeyPatch) -> None:
    grid = FakeGrid(monkeypatch, sleeps=8)
    r = rig(device([0], interval=10.0))
    r.link.silent.add(UNIT)
    await run_until_done(r.poller)
    assert grid.sleeps_taken == [10, 20, 40, 60, 60, 60, 60, 60]


async def test_busy_polls_back_off_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """A busy device is asked less often, like a failing one, while staying online."""
    grid = FakeGrid(monkeypatch, sleeps=5)
    r = rig(device([0], offline_after=1))
    r.link.then(UNIT, "ok", "busy", "busy", "busy", "ok")
    await run_until_done(r.poller)
    assert grid.sleeps_taken == [1, 1, 2, 4, 1]
    assert r.statuses == [True]


# --- which failures end a cycle ------------------------------------------------------------------


def two_blocks() -> Rig:
    """Points 0 and 100: too far apart for one block, so every poll makes two reads."""
    r = rig(device([0, 100], offline_after=1), max_gap=10)
    assert [(q.address, q.count) for q in r.group.requests] == [(0, 1), (100, 1)]
    return r


async def test_a_silent_read_lets_the_cycle_go_on() -> None:
    """NoResponse to one request (the link is up): the next block is still read and published;
    the poll counts as failed."""
    r = two_blocks()
    r.link.then(UNIT, "silent")
    assert await r.poll() == {"r100": 200}
    assert r.link.reads() == [("holding", 0, 1), ("holding", 100, 1)]
    assert r.poller.stats.failures == {"no_response": 1}
    assert r.statuses == [False]


async def test_a_modbus_exception_on_one_block_lets_the_cycle_go_on() -> None:
    r = two_blocks()
    r.link.then(UNIT, "ok", "busy")
    assert await r.poll() == {"r0": 100}
    assert len(r.link.reads()) == 2


async def test_a_dead_link_ends_the_cycle() -> None:
    """TransportError (`link_down`): the other reads would fail the same way; none is made."""
    r = two_blocks()
    r.link.then(UNIT, "down")
    assert await r.poll() == {}
    assert r.link.reads() == [("holding", 0, 1)]
    assert r.poller.stats.failures == {"link": 1}
    assert r.statuses == [False]


async def test_a_dead_link_while_splitting_ends_the_cycle() -> None:
    r = rig(device([0, 1, 100], offline_after=1), max_gap=10)
    r.link.refuse(UNIT, "holding", range(1, 2))
    r.link.then(UNIT, "ok", "down")  # block 0-1 refused, then the link dies during the search
    assert await r.poll() == {}
    assert r.link.reads() == [("holding", 0, 2), ("holding", 0, 1)]  # not 100
    assert r.statuses == [False]


# --- on-change -----------------------------------------------------------------------------------


async def test_on_change_publishes_changes_and_a_heartbeat(clock: Clock) -> None:
    """`report: on-change`: an unchanged value is not published again, a change beyond the
    deadband is, and every point is published at least every `heartbeat` seconds."""
    points = [Point(name="temp", address=0, deadband=5), Point(name="mode", address=1)]
    r = rig(Device(name="m", link="bus", unit=UNIT, interval=1.0, report="on-change",
                   heartbeat=60.0, points=points))
    r.link.set(UNIT, "holding", 0, 200, 1)
    assert await r.poll() == {"temp": 200, "mode": 1}
    clock.now += 1
    assert await r.poll() == {}
    r.link.set(UNIT, "holding", 0, 204)  # within the deadband of the last published 200
    clock.now += 1
    assert await r.poll() == {}
    r.link.set(UNIT, "holding", 0, 205, 2)
    clock.now += 1
    assert await r.poll() == {"temp": 205, "mode": 2}
    clock.now += 59
    assert await r.poll() == {}
    clock.now += 1  # 60 s since both were last published
    assert await r.poll() == {"temp": 205, "mode": 2}


async def test_on_change_publishes_every_point_again_after_offline() -> None:
    """After `offline`, the first good poll publishes every point, changed or not: whoever
    watched the status topic must not be left with values from before the outage."""
    r = rig(device([0, 1], report="on-change", offline_after=1))
    assert await r.poll() == {"r0": 100, "r1": 101}
    assert await r.poll() == {}
    r.link.then(UNIT, "silent")
    await r.poll()
    assert r.statuses == [True, False]
    assert await r.poll() == {"r0": 100, "r1": 101}
    assert await r.poll() == {}


async def test_a_busy_spell_does_not_republish_unchanged_values() -> None:
    """Busy is not offline: on-change keeps comparing with what was last published."""
    r = rig(device([0], report="on-change", offline_after=1))
    await r.poll()
    r.link.then(UNIT, "busy", "busy")
    await r.poll()
    await r.poll()
    assert await r.poll() == {}
