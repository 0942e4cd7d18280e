"""InstrumentPoller on an in-memory line port (tests/fakes.FakeLinePort): no pty, no socat.

test_instrument.py proves these over a real serial line; here each rule alone, in
milliseconds: the request is sent and its answer parsed into typed, normalised values, junk
and stale lines are counted and skipped, silence is a failed poll (`no_response`, or `link`
when the port is closed), offline after `offline_after` and back at the next answer, the
latest streamed line of each interval, and back-off only in request mode. The link timeout is
50 ms: a silent poll waits that long, as the poller does; nothing else waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from bridge.config import Device, LineLink, MqttSettings, Point
from bridge.core.messages import Message
from bridge.instrument import InstrumentPoller
from tests.fakes import FakeGrid, FakeLinePort, GridDone

TIMEOUT = 0.05
RESPONSE = (
    r"^S[TI],GS,\s*(?P<weight>[-+]?\d+\.\d+)\s*kg,(?P<count>\d+),(?P<stable>[YN])"
    r"(?:,(?P<tag>\w+))?"
)
POINTS = [
    Point(name="weight", type="float64", unit="kg", precision=2),
    Point(name="count", type="int32", scale=10),
    Point(name="stable", type="bool"),
    Point(name="tag", type="string", count=8),
]


def reading(weight: float, tag: str = "AB12") -> bytes:
    return f"ST,GS,  {weight:+.4f} kg,7,Y,{tag}\r\n".encode()


@dataclass
class Rig:
    port: FakeLinePort
    poller: InstrumentPoller[FakeLinePort]
    messages: list[Message]
    statuses: list[bool]

    def published(self, point: str) -> list[Any]:
        topic = f"m2m/gw/scale-1/{point}"
        return [json.loads(m.payload)["value"] for m in self.messages if m.topic == topic]

    def stamps(self, point: str) -> list[int]:
        topic = f"m2m/gw/scale-1/{point}"
        return [json.loads(m.payload)["ts"] for m in self.messages if m.topic == topic]


def rig(*, request: bool = True, offline_after: int = 3, response: str = RESPONSE,
        points: list[Point] = POINTS) -> Rig:
    link = LineLink(name="scale-port", type="serial", port="/dev/ttyFAKE0", timeout=TIMEOUT)
    device = Device(
        name="scale-1", link="scale-port", interval=1.0, offline_after=offline_after,
        request="SI\r\n" if request else None, response=response, points=points,
    )
    port = FakeLinePort(link)
    messages: list[Message] = []
    statuses: list[bool] = []
    poller = InstrumentPoller(device, port, MqttSettings(topic_prefix="m2m/gw"),
                              emit=messages.extend,
                              set_status=lambda _name, up: statuses.append(up))
    return Rig(port, poller, messages, statuses)


@contextlib.asynccontextmanager
async def listening(r: Rig) -> AsyncIterator[None]:
    """Attached, with a streaming poller's listener running (as `run()` has it)."""
    async with r.port.attached(r.poller.reader), asyncio.TaskGroup() as tg:
        task = tg.create_task(r.poller.listen())
        try:
            yield
        finally:
            task.cancel()


async def poll(r: Rig) -> bool:
    """One request-mode poll, attached as `run()` is."""
    async with r.port.attached(r.poller.reader):
        return await r.poller.poll_request()


# --- request mode --------------------------------------------------------------------------------


async def test_the_request_is_sent_and_its_answer_published_as_typed_values() -> None:
    """Junk before the answer is counted and skipped; the matching line becomes the points,
    typed and normalised (precision, scale) like any register."""
    r = rig()
    r.port.answer = b"\x00garbage\r\nOK\r\n" + reading(12.3456)
    assert await poll(r)
    assert r.port.written == [b"SI\r\n"]
    assert r.published("weight") == [12.35]
    assert r.published("count") == [70]
    assert r.published("stable") == [True]
    assert r.published("tag") == ["AB12"]
    assert r.statuses == [True]
    assert (r.poller.stats.lines, r.poller.stats.unmatched) == (3, 2)
    assert r.poller.last_values == {"weight": 12.35, "count": 70, "stable": True, "tag": "AB12"}


async def test_a_line_from_before_the_request_is_not_taken_for_its_answer() -> None:
    """A late answer to the previous request, or chatter, is dropped before the request."""
    r = rig()
    r.port.answer = reading(2.0)
    async with r.port.attached(r.poller.reader):
        r.port.send(reading(1.0))
        assert await r.poller.poll_request()
    assert r.published("weight") == [2.0]


async def test_an_optional_group_left_out_publishes_the_others() -> None:
    r = rig()
    r.port.answer = b"ST,GS,  +3.0000 kg,7,N\r\n"
    assert await poll(r)
    assert r.poller.last_values == {"weight": 3.0, "count": 70, "stable": False}
    assert r.published("tag") == []


async def test_a_value_of_the_wrong_type_is_counted_and_the_rest_published() -> None:
    r = rig(response=r"^(?P<level>\S+) (?P<mode>\S+)$",
            points=[Point(name="level", type="int16"), Point(name="mode", type="string",
                                                            count=4)])
    r.port.answer = b"x7 AUTO\r\n"
    assert await poll(r)  # the instrument answered: the poll succeeds
    assert r.poller.last_values == {"mode": "AUTO"}
    assert r.poller.stats.bad_values == 1


async def test_no_matching_line_in_time_is_a_failed_poll_counted_as_no_response() -> None:
    r = rig()
    r.port.answer = b"OK\r\n"
    assert not await poll(r)
    assert r.poller.stats.failures == {"no_response": 1}
    assert r.poller.stats.unmatched == 1
    assert r.messages == []


async def test_offline_after_n_silent_polls_and_online_at_the_next_answer() -> None:
    r = rig(offline_after=2)
    assert not await poll(r)
    assert r.statuses == []
    assert not await poll(r)
    assert r.statuses == [False]
    assert not await poll(r)
    assert r.statuses == [False]  # once
    r.port.answer = reading(5.0)
    assert await poll(r)
    assert r.statuses == [False, True]
    assert r.published("weight") == [5.0]
    assert len(r.port.written) == 4


async def test_a_closed_port_fails_the_poll_at_once_as_a_link_failure() -> None:
    r = rig(offline_after=1)
    r.port.answer = reading(5.0)
    r.port.close()
    assert not await poll(r)
    assert r.port.written == []
    assert r.poller.stats.failures == {"link": 1}
    assert r.statuses == [False]


async def test_silence_on_a_port_that_closed_meanwhile_is_a_link_failure() -> None:
    """The port went away while the poller waited: the link's fault, not the instrument's."""
    r = rig()
    asyncio.get_running_loop().call_soon(r.port.close)
    assert not await poll(r)
    assert r.poller.stats.failures == {"link": 1}


# --- streaming mode ------------------------------------------------------------------------------


async def test_streaming_publishes_the_latest_line_of_each_interval_with_its_time() -> None:
    r = rig(request=False)
    async with listening(r):
        r.port.send(reading(1.0), ts=1_000)
        r.port.send(b"junk\r\n" + reading(2.0), ts=2_000)
        r.port.send(reading(3.0), ts=3_000)
        assert await r.poller.poll_stream()
        r.port.send(reading(4.0), ts=4_000)
        assert await r.poller.poll_stream()
    assert r.published("weight") == [3.0, 4.0]
    assert r.stamps("weight") == [3_000, 4_000]
    assert r.poller.stats.superseded == 2
    assert r.poller.stats.unmatched == 1
    assert r.port.written == []  # a streaming instrument is never asked
    assert r.statuses == [True]


async def test_streaming_silence_goes_offline_and_the_next_line_brings_it_back() -> None:
    r = rig(request=False, offline_after=2)
    async with listening(r):
        assert not await r.poller.poll_stream()
        assert not await r.poller.poll_stream()
        assert r.statuses == [False]
        assert r.poller.stats.failures == {"no_response": 2}
        r.port.send(reading(6.0))
        assert await r.poller.poll_stream()
    assert r.statuses == [False, True]
    assert r.published("weight") == [6.0]


# --- the poll schedule ---------------------------------------------------------------------------


async def test_request_mode_backs_off_a_silent_instrument(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """Every request of a dead instrument costs the shared port a timeout: 1, 2, 4 s apart,
    and back to every second after it answers."""
    grid = FakeGrid(monkeypatch, sleeps=5)
    r = rig(offline_after=10)
    r.port.script.extend([None, None, None, reading(1.0)])
    r.port.answer = reading(1.0)
    with pytest.raises(GridDone):
        await r.poller.run()
    assert grid.sleeps_taken == [1, 2, 4, 1, 1]
    assert len(r.port.written) == 5


async def test_streaming_mode_keeps_listening_every_interval(monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    """Listening costs the line nothing: a silent streaming instrument gets no back-off, so it
    is back online at the first interval after it talks again."""
    grid = FakeGrid(monkeypatch, sleeps=3)
    r = rig(request=False)
    with pytest.RaisesGroup(GridDone):
        await r.poller.run()
    assert grid.sleeps_taken == [1, 1, 1]
    assert r.poller.stats.failed_polls == 3
