"""Link scheduling: one at a time, writes first, quiet time between transactions."""

from __future__ import annotations

import asyncio
import time

from bridge.scheduler import LinkScheduler, Priority


async def _hold(s: LinkScheduler, name: str, priority: Priority, log: list[str],
                hold: float = 0.02) -> None:
    async with s.turn(priority):
        log.append(f"+{name}")
        await asyncio.sleep(hold)
        log.append(f"-{name}")


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
    first = asyncio.create_task(_hold(s, "p0", Priority.POLL, log, 0.05))
    await asyncio.sleep(0.01)
    polls = [asyncio.create_task(_hold(s, f"p{i}", Priority.POLL, log)) for i in range(1, 4)]
    await asyncio.sleep(0.01)
    write = asyncio.create_task(_hold(s, "w", Priority.WRITE, log))
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
        ends.append(time.monotonic())

    await asyncio.gather(one(), one(), one())
    assert starts[1] - ends[0] >= 0.045
    assert starts[2] - ends[1] >= 0.045


async def test_cancelled_waiter_does_not_block_the_link() -> None:
    """A waiter cancelled while queued leaves the turn to the next one."""
    s = LinkScheduler()
    log: list[str] = []
    holder = asyncio.create_task(_hold(s, "a", Priority.POLL, log, 0.05))
    await asyncio.sleep(0.01)
    doomed = asyncio.create_task(_hold(s, "b", Priority.WRITE, log))
    after = asyncio.create_task(_hold(s, "c", Priority.POLL, log))
    await asyncio.sleep(0.01)
    doomed.cancel()
    await asyncio.wait_for(asyncio.gather(holder, after), 1)
    assert [e for e in log if e.startswith("+")] == ["+a", "+c"]
    assert s.waiting == 0
