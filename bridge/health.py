"""Liveness: telling a hung loop from an idle one, for the systemd watchdog.

A loop is healthy while none of its operations has been running longer than its bound. Idle
time (a poller sleeping until its next tick, a publisher waiting for the broker) is healthy;
an operation that never returns (a read that outlives every timeout, a publish stuck forever)
is not. This is why the watchdog does not simply ping on a timer: a timer keeps running while
the loops it is meant to guard are stuck.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from contextlib import contextmanager


class Activity:
    """Operations in progress of one loop, and the longest any may take."""

    __slots__ = ("_next", "_started", "bound", "name")

    def __init__(self, name: str, bound: float) -> None:
        self.name = name
        self.bound = bound
        self._started: dict[int, float] = {}
        self._next = itertools.count()

    @contextmanager
    def running(self) -> Iterator[None]:
        key = next(self._next)
        self._started[key] = time.monotonic()
        try:
            yield
        finally:
            del self._started[key]

    def stuck(self, now: float | None = None) -> bool:
        """Whether an operation has been running for longer than `bound` seconds."""
        if not self._started:
            return False
        now = time.monotonic() if now is None else now
        return now - min(self._started.values()) > self.bound
