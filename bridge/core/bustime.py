"""Serial-line timing (Modbus over Serial Line v1.02, 2.5.1.1): one place for the numbers.

The transports wait these times, the planner's report prices requests with them and the
simulator paces its ptys by them, so all three agree on what a line can carry.
"""

from __future__ import annotations

BITS_PER_CHAR = 11  # RTU: start + 8 data + parity (or a 2nd stop) + stop
FAST_LINE_SILENCE = 0.00175  # the spec's fixed 1.75 ms above 19200 baud


def char_time(baudrate: int, bits: int = BITS_PER_CHAR) -> float:
    """Seconds one character takes on the line."""
    return bits / baudrate


def silence(baudrate: int, bits: int = BITS_PER_CHAR) -> float:
    """Inter-frame silence: 3.5 characters, fixed at 1.75 ms above 19200 baud."""
    return FAST_LINE_SILENCE if baudrate > 19200 else 3.5 * char_time(baudrate, bits)
