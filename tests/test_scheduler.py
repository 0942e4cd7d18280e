"""Link scheduling: one at a time, writes first, quiet time between transactions.

Order is set up by explicit synchronisation (a holder keeps its turn until released, queued
waiters are counted), never by short sleeps a loaded machine would stretch."""

from __future__ import annotations

import asyncio
import time

from bridge.transports.link import LinkScheduler, Priority
from tests.helpers import until


async def _hold(s: LinkScheduler, name: str, priority: Priority, log: list[str],
                hold: float | asyncio.Event = 0.02) -> None:
    """Take a turn, log it, and keep it for `hold` seconds or until the event is set."""
    async with s.turn(priority):
        log.append(f"+{name}")
        if isinstance(hold, asyncio.Event):
            await hold.wait()
        else:
            await asyncio.sleep(hold)  # gives the others their chance to (wrongly) overlap
        log.append(f"-{name}")


async def _holding(s: LinkScheduler, name: str, log: list[str],
                   release: asyncio.Event) -> asyncio.Task[None]:
    """A poll that has the link (until `release`) by the time this returns."""
    task = asyncio.create_task(_hold(s, name, Priority.POLL, log, release))
    await until(lambda: f"+{name}" in log, what=f"{name} to take the link")
    return task


async def test_one_transaction_at_a_time() -> None:
    """No two holders overlap."""
    s = LinkScheduler()
    log: list[str] = []
    await asyncio.gather(*(_hold(s, str(i), Priority.POLL, log) for i in range(5)))
    assert all(log[i][0] == "+" and log[i + 1] == "-" + log[i][1:] for i in range(0, 10, 2))


async def test_write_goes_ahead_of_queued_polls() -> None:
    """A write queued behind several polls is served next."""
    s = LinkScheduler()
    log: list[str] = []
    release = asyncio.Event()
    first = await _holding(s, "p0", log, release)
    polls = [asyncio.create_task(_hold(s, f"p{i}", Priority.POLL, log)) for i in range(1, 4)]
    await until(lambda: s.waiting == 3, what="three polls queued")
    write = asyncio.create_task(_hold(s, "w", Priority.WRITE, log))
    await until(lambda: s.waiting == 4, what="the write queued behind them")
    release.set()
    await asyncio.gather(first, write, *polls)
    starts = [e[1:] for e in log if e.startswith("+")]
    assert starts == ["p0", "w", "p1", "p2", "p3"]


async def test_silence_between_transactions() -> None:
    """The next transaction starts no earlier than `silence` after the last one ended."""
    s = LinkScheduler(silence=0.05)
    ends: list[float] = []
    starts: list[float] = []

    async def one() -> None:
        async with s.turn(Priority.POLL):
            starts.append(time.monotonic())
            ends.append(time.monotonic())  # the transaction's last moment, before the release

    await asyncio.gather(one(), one(), one())
    assert starts[1] - ends[0] >= 0.045
    assert starts[2] - ends[1] >= 0.045


async def test_cancelled_waiter_does_not_block_the_link() -> None:
    """A waiter cancelled while queued leaves the turn to the next one."""
    s = LinkScheduler()
    log: list[str] = []
    release = asyncio.Event()
    holder = await _holding(s, "a", log, release)
    doomed = asyncio.create_task(_hold(s, "b", Priority.WRITE, log))
    after = asyncio.create_task(_hold(s, "c", Priority.POLL, log))
    await until(lambda: s.waiting == 2, what="b and c queued")
    doomed.cancel()
    await until(doomed.done, what="b to be cancelled")
    release.set()
    await asyncio.wait_for(asyncio.gather(holder, after), 30)
    assert [e for e in log if e.startswith("+")] == ["+a", "+c"]
    assert s.waiting == 0
