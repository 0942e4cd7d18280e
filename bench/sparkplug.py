"""In-process cost of one poll's messages: per-point JSON, per-device JSON, Sparkplug DDATA.

DESIGN.md "Performance model": Sparkplug B no dearer in CPU than per-device JSON. This times
what the daemon does with one poll's values before MQTT: `bridge.core.outbox.Outbox.messages`
(topics and payloads; for Sparkplug also the last values a DBIRTH would carry, and the DDATA
without `seq`, as the buffer stores it), and for Sparkplug appending `seq` as the session does
when it sends it. DESIGN.md's setup: a device of `--points` (100) uint16 holding points, every
value published, values changing from poll to poll. No MQTT, no broker.

    .venv/bin/python bench/sparkplug.py                 # 7 runs of 2000 polls each
    .venv/bin/python bench/sparkplug.py --points 30 --runs 11

It prints, per format, µs of CPU per value (median of `--runs`, and the fastest and slowest
run), payload bytes per value (MQTT topics and headers excluded: `bench/pipeline.py` counts
those) and the ratio to per-device JSON.
"""

from __future__ import annotations

import argparse
import gc
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bridge.config import Device, MqttSettings, Point  # noqa: E402
from bridge.config.model import Sparkplug  # noqa: E402
from bridge.core.codec import Value  # noqa: E402
from bridge.core.messages import Message  # noqa: E402
from bridge.core.outbox import Outbox  # noqa: E402
from bridge.core.sparkplug import NodeMetrics  # noqa: E402
from bridge.core.sparkplug_stored import sequenced  # noqa: E402

FORMATS = ("per-point", "per-device", "sparkplug")
POLLS = 64  # distinct polls cycled through (values differ poll to poll, as on a live bus)


def outbox(fmt: str, device: Device) -> Outbox:
    if fmt == "sparkplug":
        settings = MqttSettings(format="sparkplug",
                                sparkplug=Sparkplug(group_id="plant", edge_node_id="gw"))
        box = Outbox(device, settings)
        box.use_metrics(NodeMetrics([device]).device(device.name))
        return box
    return Outbox(device, MqttSettings(messages=fmt))


def poll(fmt: str, box: Outbox) -> Callable[[dict[str, Value], int], list[Message]]:
    """What the daemon does per poll in `fmt`, up to the bytes it writes to the broker."""
    if fmt != "sparkplug":
        return lambda values, ts: box.messages(values, ts, 0.0)

    def build_and_sequence(values: dict[str, Value], ts: int) -> list[Message]:
        messages = box.messages(values, ts, 0.0)
        for message in messages:  # the session's share: seq appended on the way out
            sequenced(message.payload, ts & 0xFF)
        return messages

    return build_and_sequence


def one_run(work: Callable[[dict[str, Value], int], list[Message]],
            polls: list[dict[str, Value]], count: int) -> float:
    """CPU seconds for `count` polls."""
    gc_was = gc.isenabled()
    gc.disable()
    try:
        start = time.process_time()
        ts = 1_764_000_000_000
        for i in range(count):
            work(polls[i % POLLS], ts + i * 1000)
        return time.process_time() - start
    finally:
        if gc_was:
            gc.enable()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--points", type=int, default=100, help="uint16 points (default 100)")
    parser.add_argument("--polls", type=int, default=2000, help="polls per run (default 2000)")
    parser.add_argument("--runs", type=int, default=7, help="runs per format (default 7)")
    args = parser.parse_args(argv)
    if args.points < 1 or args.polls < 1 or args.runs < 1:
        parser.error("--points, --polls and --runs must be >= 1")

    device = Device(name="unit-01", link="plc", unit=1, points=[
        Point(name=f"r{a:03d}", address=a, type="uint16") for a in range(args.points)
    ])
    rng = random.Random(1)
    polls: list[dict[str, Value]] = [
        {p.name: rng.randrange(65536) for p in device.points} for _ in range(POLLS)
    ]
    work = {fmt: poll(fmt, outbox(fmt, device)) for fmt in FORMATS}
    size = {
        fmt: sum(len(m.payload) for m in work[fmt](polls[0], 1_764_000_000_000))
        for fmt in FORMATS
    }
    times: dict[str, list[float]] = {fmt: [] for fmt in FORMATS}
    for fmt in FORMATS:
        one_run(work[fmt], polls, max(1, args.polls // 10))  # warm up
    for _ in range(args.runs):  # formats alternate run by run: load changes hit all alike
        for fmt in FORMATS:
            seconds = one_run(work[fmt], polls, args.polls)
            times[fmt].append(seconds / (args.polls * args.points) * 1e6)

    print(f"m2m-bridge message build bench: 1 device x {args.points} uint16 points, every "
          f"value published; {args.runs} runs of {args.polls} polls per format")
    print(f"python {platform.python_version()} ({platform.machine()})")
    print()
    base = statistics.median(times["per-device"])
    print(f"{'format':<11} {'µs/value':>8} {'(min':>6} {'max)':>6} {'B/value':>8} "
          f"{'vs per-device':>14}")
    for fmt in FORMATS:
        us = statistics.median(times[fmt])
        print(f"{fmt:<11} {us:>8.3f} {min(times[fmt]):>6.3f} {max(times[fmt]):>6.3f} "
              f"{size[fmt] / args.points:>8.2f} {us / base:>13.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
