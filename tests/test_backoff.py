"""The one back-off rule of every retrying loop (bridge.core.backoff)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from bridge.core.backoff import backoff


@given(attempt=st.integers(1, 10_000), first=st.floats(0.001, 10), cap=st.floats(0.01, 3600))
def test_the_wait_doubles_is_capped_and_jittered_but_never_zero(
    attempt: int, first: float, cap: float
) -> None:
    """Between half and all of min(cap, first * 2**(attempt-1)); no overflow after days."""
    step = min(cap, first * 2.0 ** min(attempt - 1, 64))
    assert 0.5 * step <= backoff(attempt, first=first, cap=cap) <= step


def test_no_failure_no_wait() -> None:
    assert backoff(0, first=1, cap=60) == 0.0


def test_first_retries_double() -> None:
    """1 s, 2 s, 4 s (each at least half of that), then 60 s at most."""
    for attempt, step in ((1, 1.0), (2, 2.0), (3, 4.0), (20, 60.0)):
        assert 0.5 * step <= backoff(attempt, first=1.0, cap=60.0) <= step
