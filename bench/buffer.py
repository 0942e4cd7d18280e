"""The disk buffer's own CPU per message, in process: put, take and ack as the daemon uses them.

No broker, no daemon: a DiskBuffer in a temp dir ($TMPDIR: put it on the gateway's kind of
disk, not a tmpfs, to count the WAL writes and the fsync every SYNC_EVERY seconds) and
realistic per-point messages (`m2m/bench/unit-03/r042`, `{"value":1234,"ts":...}`). Each case
prints CPU µs per message, the median of `--repeat` runs:

- live, per-point: the steady state of `messages: per-point`: each device's poll is one put of
  `--points` messages, and the publisher takes (500 at most) and acks what is there;
- live, per-device: the same with one message per put (`messages: per-device`, Sparkplug);
- backlog: `--polls` polls put with nobody taking, then drained by take(500) + ack.

    .venv/bin/python bench/buffer.py
    PYTHONPATH=/tmp/other-checkout .venv/bin/python bench/buffer.py   # another version's

It uses only put(), take(), ack() and the row ids, so it runs against older versions too.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if "PYTHONPATH" not in os.environ:
    sys.path.insert(0, str(ROOT))

from bridge.buffer import DiskBuffer  # noqa: E402
from bridge.core.messages import Message  # noqa: E402

TAKE = 500  # the MQTT 5 session's batch
DEVICES = 10
START_MS = time.time_ns() // 1_000_000 - 86_400_000  # a day ago: well within max_age


def poll(device: int, points: int, n: int) -> list[Message]:
    """Device `device`'s poll number `n`: `points` per-point messages, as the poller makes them."""
    ts = START_MS + n * 1000
    return [Message(f"m2m/bench/unit-{device:02d}/r{p:03d}",
                    b'{"value":%d,"ts":%d}' % ((n * 7 + p) % 65536, ts), 1, False, ts)
            for p in range(points)]


def new_buffer(tmp: Path) -> DiskBuffer:
    return DiskBuffer(tmp / "state" / "buffer.sqlite3", max_messages=10**7,
                      max_bytes=1 << 40, max_age=7 * 86400)


def cpu_us_per_message(work: Callable[[DiskBuffer], int]) -> float:
    """CPU µs per message of `work` on a fresh buffer (it returns the messages it moved)."""
    with tempfile.TemporaryDirectory(prefix="m2m-buffer-bench-") as tmp:
        buffer = new_buffer(Path(tmp))
        try:
            start = time.process_time()
            moved = work(buffer)
            return (time.process_time() - start) * 1e6 / moved
        finally:
            buffer.close()


def drain(buffer: DiskBuffer) -> None:
    while taken := buffer.take(TAKE):
        buffer.ack([s.id for s in taken])


def live(polls: list[list[Message]]) -> Callable[[DiskBuffer], int]:
    """Every device's poll put, then what is there taken and acked, one second after another."""

    def work(buffer: DiskBuffer) -> int:
        for i in range(0, len(polls), DEVICES):
            for messages in polls[i : i + DEVICES]:
                buffer.put(messages)
            drain(buffer)
        return sum(len(p) for p in polls)

    return work


def backlog(polls: list[list[Message]]) -> Callable[[DiskBuffer], int]:
    def work(buffer: DiskBuffer) -> int:
        for messages in polls:
            buffer.put(messages)
        drain(buffer)
        return sum(len(p) for p in polls)

    return work


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--polls", type=int, default=2000, help="polls per case (default 2000)")
    parser.add_argument("--points", type=int, default=100, help="messages per per-point poll")
    parser.add_argument("--repeat", type=int, default=5, help="runs per case (default 5)")
    args = parser.parse_args()
    print(f"DiskBuffer CPU per message: {sys.modules[DiskBuffer.__module__].__file__}")
    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}; median of {args.repeat} runs")
    per_point = [poll(i % DEVICES, args.points, i // DEVICES) for i in range(args.polls)]
    per_device = [poll(i % DEVICES, 1, i // DEVICES) for i in range(args.polls * 10)]
    cases = {
        f"live, per-point ({args.points} a put)": live(per_point),
        "live, per-device (1 a put)": live(per_device),
        f"backlog of {args.polls} polls, drained": backlog(per_point),
    }
    for label, work in cases.items():
        runs = [cpu_us_per_message(work) for _ in range(args.repeat)]
        print(f"  {label:<36} {statistics.median(runs):6.2f} µs/message "
              f"(runs {min(runs):.2f}-{max(runs):.2f})")


if __name__ == "__main__":
    main()
