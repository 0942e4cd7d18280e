"""The buffer between polling and publishing: bounded, ordered, transactional.

Polling puts messages in and never waits; the publisher takes a batch, and either acknowledges
it (delivered: gone) or returns it (not delivered: back at the front, order kept). This is
Telegraf's transactional output buffer. Bounds are count and bytes; when full the oldest go
first and are counted, because for telemetry the newest reading is the one worth keeping.

This is the in-memory stage; the disk-backed store with the same interface (surviving restarts
and power loss) replaces it in the store-and-forward issue.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable

from bridge.messages import Message


class MemoryBuffer:
    """A bounded FIFO of messages with take / ack / requeue."""

    def __init__(self, *, max_messages: int, max_bytes: int) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._queue: deque[Message] = deque()
        self._bytes = 0
        self._ready = asyncio.Event()
        self.dropped = 0
        self.accepted = 0

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def bytes(self) -> int:
        return self._bytes

    def put(self, messages: Iterable[Message]) -> None:
        """Append messages; drop the oldest beyond the bounds. Never blocks."""
        for message in messages:
            self._queue.append(message)
            self._bytes += _size(message)
            self.accepted += 1
        while self._queue and (
            len(self._queue) > self.max_messages or self._bytes > self.max_bytes
        ):
            self._bytes -= _size(self._queue.popleft())
            self.dropped += 1
        if self._queue:
            self._ready.set()

    async def wait(self) -> None:
        """Return once there is something to take."""
        while not self._queue:
            self._ready.clear()
            await self._ready.wait()

    def take(self, limit: int) -> list[Message]:
        """Remove and return up to `limit` of the oldest messages: the caller owns them now."""
        n = min(limit, len(self._queue))
        batch = [self._queue.popleft() for _ in range(n)]
        self._bytes -= sum(_size(m) for m in batch)
        return batch

    def requeue(self, batch: list[Message]) -> None:
        """Give back messages that were not delivered, ahead of everything newer."""
        self._queue.extendleft(reversed(batch))
        self._bytes += sum(_size(m) for m in batch)
        if self._queue:
            self._ready.set()


def _size(message: Message) -> int:
    return len(message.topic) + len(message.payload)
