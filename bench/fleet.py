"""What a fleet of gateways costs one broker: N bridge processes, one mosquitto, one device.

DESIGN.md "Beyond one gateway": a thousand gateways on one broker is an extrapolation from
measurement. This starts `--gateways` daemons (default 50), each with its own gateway id,
state dir and a small map (`--points` uint16 holding registers of one unit, polled every
`--interval`), all against one `m2m-bridge simulate` (its CPU is not counted) and one private
mosquitto on 127.0.0.1; then, over a window after a warm-up, it measures:

- per gateway: CPU (utime + stime from /proc) per second and per value, and RSS;
- the broker: its CPU, and the messages and bytes it received per second (mosquitto's own
  `$SYS/broker/messages/received` and `$SYS/broker/bytes/received` counters, published every
  second here), per gateway and per value;

and prints them with a line that scales the broker's figures to 1000 gateways. It asserts
nothing: figures drift between machines, and the ratios are what carry over.

    .venv/bin/python bench/fleet.py                          # 50 gateways x 10 points, 1 s
    .venv/bin/python bench/fleet.py --gateways 20 --seconds 20 --mode per-point
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # pipeline: bench/ is this folder
from pipeline import (
    PYTHON,
    VALUES_IN,
    cpu_seconds,
    process,
    rss_mib,
    simulated_device,
    subscriber,
    tail,
)

START_TIMEOUT = 120.0  # every gateway's first value, from the last start
SYS_TOPICS = ("$SYS/broker/messages/received", "$SYS/broker/bytes/received")


def write_configs(
    tmp: Path, *, gateways: int, points: int, interval: float, mode: str, broker: int,
    device: int,
) -> tuple[Path, list[Path]]:
    """The simulator's config (one unit per gateway, up to 247, reused round robin) and one
    config per gateway."""
    point_list = [{"name": f"r{a:02d}", "address": a, "type": "uint16",
                   "simulate": {"value": a, "drift": 1}} for a in range(points)]
    units = min(gateways, 247)
    link = {"name": "plc", "type": "tcp", "host": "127.0.0.1", "port": device, "timeout": "2s"}
    sim = tmp / "simulator.yaml"
    sim.write_text(yaml.safe_dump({
        "version": 1, "gateway": {"id": "sim", "state_dir": str(tmp / "sim-state")},
        "mqtt": {"host": "127.0.0.1", "port": broker},
        "links": [link],
        "devices": [{"name": f"unit-{u:03d}", "link": "plc", "unit": u, "points": point_list}
                    for u in range(1, units + 1)],
    }, sort_keys=False))
    configs = []
    for i in range(gateways):
        home = tmp / f"gw-{i:04d}"
        home.mkdir()
        doc: dict[str, Any] = {
            "version": 1,
            "gateway": {"id": f"gw-{i:04d}", "state_dir": str(home / "state")},
            "mqtt": {"host": "127.0.0.1", "port": broker, "messages": mode, "qos": 1},
            "links": [link],
            "devices": [{"name": "meter", "link": "plc", "unit": i % units + 1,
                         "interval": interval, "points": point_list}],
        }
        path = home / "bridge.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        configs.append(path)
    return sim, configs


class Arrivals:
    """Values received per gateway (`m2m/<gateway>/…`) and the broker's $SYS counters, as
    paho's network thread sees them."""

    def __init__(self, mode: str) -> None:
        self.values_in = VALUES_IN[mode]
        self.values: dict[str, int] = {}
        self.sys: dict[str, int] = {}
        self._lock = threading.Lock()

    def on_message(self, client: mqtt.Client, message: mqtt.MQTTMessage) -> None:
        topic = message.topic
        if topic in SYS_TOPICS:
            with self._lock:
                self.sys[topic] = int(message.payload)
            return
        n = self.values_in(topic, bytes(message.payload))  # m2m/<gateway>/… like the bench's
        if n:
            gateway = topic.split("/")[1]
            with self._lock:
                self.values[gateway] = self.values.get(gateway, 0) + n

    def snapshot(self) -> tuple[dict[str, int], dict[str, int]]:
        with self._lock:
            return dict(self.values), dict(self.sys)


@dataclass(frozen=True)
class Gateway:
    name: str
    pid: int


@contextlib.contextmanager
def fleet(configs: list[Path]) -> Iterator[list[Gateway]]:
    """Every gateway's daemon, started one after another, stopped by id on the way out."""
    with contextlib.ExitStack() as stack:
        started = []
        for config in configs:
            child = stack.enter_context(process(
                [PYTHON, "-m", "bridge", "--log-json", "run", "-c", str(config)],
                config.parent / "daemon.log",
            ))
            started.append(Gateway(config.parent.name, child.pid))
        yield started


def wait_for_values(arrivals: Arrivals, gateways: list[Gateway], configs: list[Path]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        values, _ = arrivals.snapshot()
        silent = [g for g in gateways if not values.get(g.name)]
        if not silent:
            return
        for gateway, config in zip(gateways, configs, strict=True):
            if not Path(f"/proc/{gateway.pid}").exists():
                raise RuntimeError(f"{gateway.name} exited:\n{tail(config.parent / 'daemon.log')}")
        if time.monotonic() > deadline:
            first = configs[gateways.index(silent[0])]
            raise RuntimeError(f"{len(silent)} gateway(s) sent no value within "
                               f"{START_TIMEOUT:g} s; {silent[0].name}:\n"
                               f"{tail(first.parent / 'daemon.log')}")
        time.sleep(0.2)


def summary(label: str, figures: list[float], unit: str, digits: int = 2) -> str:
    return (f"  {label:<26} mean {statistics.fmean(figures):>9.{digits}f} {unit:<9} "
            f"(median {statistics.median(figures):.{digits}f}, min {min(figures):.{digits}f}, "
            f"max {max(figures):.{digits}f})")


@dataclass(frozen=True)
class Window:
    """What the measurement window saw."""

    seconds: float
    values: list[int]  # per gateway
    cpu: list[float]  # per gateway, s
    rss: list[float]  # per gateway, MiB
    broker_cpu: float  # s
    messages: int  # the broker received
    received: int  # bytes the broker received


def measure(args: argparse.Namespace) -> Window:
    from tests.helpers import free_port, mosquitto

    with tempfile.TemporaryDirectory(prefix="m2m-fleet-") as tmp_name:
        tmp = Path(tmp_name)
        with mosquitto(tmp, "sys_interval 1\n") as broker:
            assert broker.process is not None
            device = free_port()
            sim, configs = write_configs(
                tmp, gateways=args.gateways, points=args.points, interval=args.interval,
                mode=args.mode, broker=broker.port, device=device)
            arrivals = Arrivals(args.mode)
            with simulated_device(sim, device), \
                    subscriber(broker.port, ["m2m/#", *SYS_TOPICS], arrivals.on_message), \
                    fleet(configs) as gateways:
                started = time.monotonic()
                wait_for_values(arrivals, gateways, configs)
                print(f"all {len(gateways)} gateways publishing after "
                      f"{time.monotonic() - started:.1f} s", flush=True)
                time.sleep(args.warmup)
                cpu0 = [cpu_seconds(g.pid) for g in gateways]
                broker0 = cpu_seconds(broker.process.pid)
                values0, sys0 = arrivals.snapshot()
                t0 = time.monotonic()
                time.sleep(args.seconds)
                cpu1 = [cpu_seconds(g.pid) for g in gateways]
                broker1 = cpu_seconds(broker.process.pid)
                values1, sys1 = arrivals.snapshot()
                t1 = time.monotonic()
                rss = [rss_mib(g.pid) for g in gateways]
    return Window(
        seconds=t1 - t0,
        values=[values1.get(g.name, 0) - values0.get(g.name, 0) for g in gateways],
        cpu=[b - a for a, b in zip(cpu0, cpu1, strict=True)],
        rss=rss,
        broker_cpu=broker1 - broker0,
        messages=sys1.get(SYS_TOPICS[0], 0) - sys0.get(SYS_TOPICS[0], 0),
        received=sys1.get(SYS_TOPICS[1], 0) - sys0.get(SYS_TOPICS[1], 0),
    )


def report(w: Window, expected: float) -> None:
    n, seconds, values = len(w.values), w.seconds, sum(w.values)
    nan = float("nan")
    print(f"window {seconds:.1f} s: {values / seconds:.0f} values/s delivered "
          f"(expected {expected:.0f}); $SYS counters are the broker's own (1 s resolution)")
    print()
    print("per gateway")
    print(summary("CPU", [c / seconds * 100 for c in w.cpu], "%"))
    # One gateway's CPU is a few clock ticks a window; the fleet's sum is what is precise.
    print(f"  {'CPU per value':<26} mean {sum(w.cpu) / values * 1e6 if values else nan:>9.1f} µs"
          f"        (the fleet's CPU over its values; one gateway's window holds few ticks)")
    print(summary("RSS", w.rss, "MiB", 1))
    print()
    print("the broker (mosquitto)")
    print(f"  CPU                        {w.broker_cpu / seconds * 100:9.2f} %         "
          f"({w.broker_cpu / n / seconds * 1e6:.0f} µs/s per gateway, "
          f"{w.broker_cpu / values * 1e6 if values else nan:.2f} µs per value)")
    print(f"  messages received          {w.messages / seconds:9.1f} /s        "
          f"({w.messages / n / seconds:.2f} per gateway)")
    print(f"  bytes received             {w.received / seconds:9.0f} B/s       "
          f"({w.received / n / seconds:.0f} per gateway, "
          f"{w.received / values if values else nan:.1f} per value)")
    print()
    scale = 1000 / n
    print(f"extrapolated to 1000 gateways like these: broker CPU "
          f"{w.broker_cpu / seconds * scale * 100:.0f} % of one core, "
          f"{w.messages / seconds * scale:.0f} messages/s, "
          f"{w.received / seconds * scale / 1e6:.2f} MB/s in (linear in gateways: check with "
          f"two --gateways values that it is)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--gateways", type=int, default=50, help="bridge processes (default 50)")
    parser.add_argument("--points", type=int, default=10,
                        help="uint16 points per gateway's one device (default 10)")
    parser.add_argument("--interval", type=float, default=1.0, help="poll interval, s (default 1)")
    parser.add_argument("--mode", choices=["per-device", "per-point"], default="per-device",
                        help="message shape (default per-device), QoS 1")
    parser.add_argument("--warmup", type=float, default=10.0,
                        help="seconds after every gateway's first value (default 10)")
    parser.add_argument("--seconds", type=float, default=30.0, help="window (default 30)")
    args = parser.parse_args(argv)
    if args.gateways < 1 or not 1 <= args.points <= 125 or args.interval <= 0:
        parser.error("--gateways >= 1, --points 1..125 and --interval > 0")
    if args.seconds <= 0 or args.warmup < 0:
        parser.error("--seconds must be > 0 and --warmup >= 0")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    expected = args.gateways * args.points / args.interval
    print(f"m2m-bridge fleet bench: {args.gateways} gateways x {args.points} uint16 points "
          f"every {args.interval:g} s, {args.mode} messages at QoS 1, one mosquitto, one "
          f"simulated device")
    print(f"expected {expected:.0f} values/s; warm-up {args.warmup:g} s, window "
          f"{args.seconds:g} s")
    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs, load average {load}")
    print(flush=True)
    report(measure(args), expected)
    return 0


if __name__ == "__main__":
    sys.exit(main())
