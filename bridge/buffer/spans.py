"""Spans of in-flight ids: ranges take() skips without reading the rows.

The publisher takes the oldest rows not in flight. With a large backlog in flight (a replay
waiting for its acks) a query from the front would read every in-flight row again to skip it;
instead the buffer remembers ranges [start, end] of ids in which every stored row is in flight,
and take() jumps over them. A hint only: take() also filters on the in-flight set, so the
spans may be forgotten at any time (too fragmented, or nothing in flight) without harm.
"""

from __future__ import annotations

import bisect

MAX_SPANS = 256  # in-flight id ranges remembered before the hint is dropped


class Spans:
    """The in-flight span bookkeeping of `DiskBuffer` (sorted, disjoint, not touching)."""

    _starts: list[int]  # set up by DiskBuffer.__init__
    _ends: list[int]

    def _add_span(self, start: int, end: int) -> None:
        """Remember that every stored row in [start, end] is in flight; merge with neighbours."""
        if end < start:
            return
        starts, ends = self._starts, self._ends
        i = bisect.bisect_left(starts, start)
        if i > 0 and ends[i - 1] >= start - 1:  # touches the one before
            i -= 1
            start = starts[i]
            end = max(end, ends[i])
            del starts[i], ends[i]
        if i < len(starts) and starts[i] <= end + 1:  # touches the one after
            end = max(end, ends[i])
            del starts[i], ends[i]
        starts.insert(i, start)
        ends.insert(i, end)
        if len(starts) > MAX_SPANS:  # fragmented by requeues: forget; take() filters anyway
            starts.clear()
            ends.clear()

    def _split_span(self, id_: int) -> None:
        """`id_` is no longer in flight: take it out of the span holding it."""
        starts, ends = self._starts, self._ends
        i = bisect.bisect_right(starts, id_) - 1
        if i < 0 or ends[i] < id_:
            return
        start, end = starts[i], ends[i]
        del starts[i], ends[i]
        if id_ + 1 <= end:
            starts.insert(i, id_ + 1)
            ends.insert(i, end)
        if start <= id_ - 1:
            starts.insert(i, start)
            ends.insert(i, id_ - 1)
