"""The one back-off rule every retrying loop uses: device polls, serial line ports, Modbus
connections and the broker connection.

The wait before retry `n` (1 = the first) is `first * 2**(n-1)`, capped at `cap`, times a
random factor in [0.5, 1.0) ("equal jitter"): many gateways or devices failing together spread
their retries out, and none retries at once (full jitter's `uniform(0, step)` can pick ~0 and
hammer a device that is rebooting).
"""

from __future__ import annotations

import random

# 2.0**64 is still a float; the exponent is bounded so a loop failing for days cannot raise
# OverflowError (2**1024 is none), long after the cap has taken over.
_MAX_EXPONENT = 64


def backoff(attempt: int, *, first: float, cap: float) -> float:
    """Seconds to wait before retry number `attempt` (1-based); 0 for attempt 0."""
    if attempt < 1:
        return 0.0
    step = min(cap, first * 2.0 ** min(attempt - 1, _MAX_EXPONENT))
    return step * random.uniform(0.5, 1.0)
