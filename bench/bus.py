"""Bus utilisation: registers per second through the paced serial simulator vs the line's limit.

    .venv/bin/python bench/bus.py                        # 9600 and 19200 baud, 10 s each
    .venv/bin/python bench/bus.py --baud 9600 --seconds 30 --meters 5
    .venv/bin/python bench/bus.py --polled               # the scheduler: overloaded and slack

Setup: `--meters` (3) Eastron SDM630 meters (configs/maps/eastron-sdm630.yaml, units 1..N) on
one `rtu` link, 8N2 (11 bits a character, as the RTU spec wants; 8E1 cannot be
set on a Linux pty: pyserial's reconfigure gets EINVAL, so the bench uses the spec's other
11-bit framing). `m2m-bridge simulate --baud B`
runs as a separate process and serves them on a pty whose wire is paced like a real line
(bridge.sim.serial). The bench then reads every planned request of every meter back to back,
as fast as the bus allows, through the daemon's own path: transports.links.build_links -> Link
(scheduler, inter-frame silence) -> ModbusClient (pymodbus RTU framer on pyserial).

Theoretical limit for the same requests: each one costs report.rtu_seconds (request and reply
frames at 11 bits a byte, plus the 3.5-character silence after each frame); registers per
cycle / that time is the most any master could get. Utilisation = achieved / limit. Target
(issue 3): at least 95%.

`--polled` (issue 13): the daemon's scheduler instead of a loop of reads. Devices of 100 uint16
holding registers (one 100-register read a poll: 252 ms at 9600 baud, 126 ms at 19200) are
polled by DevicePoller (bridge.poller, poll_on_grid) over the same Link, with intervals chosen
to load the line at a given share of its time: one device whose interval is just under its
read, one at ~250%, 3 and 6 devices at 150% and 300%, one fast device beside two slow ones,
and 3 devices with slack (75%). Line use = reads completed in the window x each read's line
time / window (the window runs from one read's end to another's, so it holds whole reads);
a work-conserving scheduler keeps it at the physical limit (target >= 97%) whenever the polls
need more than 100%, and at the polls' own demand otherwise. Fairness: reads/s per device.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bridge.config import SerialLink, load_config  # noqa: E402
from bridge.core.bustime import rtu_seconds  # noqa: E402
from bridge.core.planner import ReadRequest, plan_device  # noqa: E402
from bridge.poller import DevicePoller  # noqa: E402
from bridge.transports.link import Link, Priority  # noqa: E402
from bridge.transports.links import build_links  # noqa: E402

MAP = ROOT / "configs" / "maps" / "eastron-sdm630.yaml"


def write_config(path: Path, port: str, baud: int, meters: int) -> None:
    devices = "".join(
        f"  - {{name: meter-{u}, link: rs485-1, unit: {u}, interval: 1s, map: '{MAP}'}}\n"
        for u in range(1, meters + 1)
    )
    path.write_text(
        "version: 1\ngateway: {id: bench}\nlinks:\n"
        f"  - {{name: rs485-1, type: rtu, port: '{port}', baudrate: {baud}, stopbits: 2,"
        " timeout: 1s}\n"
        f"devices:\n{devices}"
    )


REGISTERS = 100  # per polled device: one read of holding 0-99
POLLED_UNITS = 6


def write_polled_config(path: Path, port: str, baud: int, intervals: list[float]) -> None:
    """Devices of REGISTERS uint16 holding points on one rtu link, polled at `intervals`
    (units 1..N); with no intervals, POLLED_UNITS devices (what the simulator serves)."""
    points = "".join(f"      - {{name: r{a}, address: {a}}}\n" for a in range(REGISTERS))
    devices = "".join(
        f"  - name: dev-{u}\n    link: rs485-1\n    unit: {u}\n    interval: {ms}ms\n"
        f"    points:\n{points}"
        for u, ms in enumerate(
            (round(i * 1000) for i in intervals or [1.0] * POLLED_UNITS), start=1)
    )
    path.write_text(
        "version: 1\ngateway: {id: bench}\nlinks:\n"
        f"  - {{name: rs485-1, type: rtu, port: '{port}', baudrate: {baud}, stopbits: 2,"
        " timeout: 1s}\n"
        f"devices:\n{devices}"
    )


def scenarios(read: float) -> list[tuple[str, list[float]]]:
    """(name, interval per device) for a read of `read` seconds; intervals in whole ms."""

    def ms(seconds: float) -> float:
        return max(0.001, round(seconds, 3))

    return [
        ("1 dev, interval < read (~101%)", [ms(read * 0.99)]),
        ("1 dev, ~250%", [ms(read / 2.5)]),
        ("3 devs, 150%", [ms(3 * read / 1.5)] * 3),
        ("3 devs, 300%", [ms(3 * read / 3.0)] * 3),
        ("6 devs, 150%", [ms(6 * read / 1.5)] * 6),
        ("6 devs, 300%", [ms(6 * read / 3.0)] * 6),
        ("1 fast + 2 slow", [ms(read / 2)] + [ms(8 * read)] * 2),
        ("3 devs, slack (75%)", [ms(3 * read / 0.75)] * 3),
    ]


class Recording(Link):
    """The Link the daemon builds, also noting when each read ended, and for which unit."""

    def __init__(self, link: Link) -> None:
        super().__init__(link.client, silence=link.scheduler.silence)
        self.ends: list[tuple[float, int]] = []

    async def read(
        self, unit: int, request: ReadRequest, priority: Priority = Priority.POLL
    ) -> list[int]:
        words = await super().read(unit, request, priority)
        self.ends.append((time.monotonic(), unit))
        return words


@dataclass(frozen=True)
class Polled:
    read_ms: float  # line time of one read
    demand: float  # line time the configured polls ask for, per second
    use: float  # line time used, per second of the window
    per_device: list[float]  # reads/s
    counts: list[int]  # reads in the window
    wanted: list[float]  # reads/s configured (1 / interval)
    failed: int


async def measure_polled(config_path: Path, warmup: float, seconds: float) -> Polled:
    config = load_config(config_path)
    link_config = config.link("rs485-1")
    assert isinstance(link_config, SerialLink)
    link = Recording(build_links(config)["rs485-1"])
    pollers = [
        DevicePoller(device, plan_device(device.points, interval=device.interval,
                                         max_registers=link_config.max_registers,
                                         max_gap=link_config.max_gap),
                     link, config.mqtt, emit=lambda _m: None, set_status=lambda _n, _up: None)
        for device in config.devices
    ]
    assert all(len(p.plan) == 1 and len(p.plan[0].requests) == 1 for p in pollers)
    request = pollers[0].plan[0].requests[0]  # one read of REGISTERS a poll, the same for all
    read = rtu_seconds(request, link_config.baudrate)
    tasks = [asyncio.create_task(p.run()) for p in pollers]
    try:
        await asyncio.sleep(warmup + seconds)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        link.close()
    # The window runs from the first read ending after the warm-up to the last one ending in
    # time, so it holds whole reads only.
    first = link.ends[0][0]
    inside = [(t, u) for t, u in link.ends if first + warmup <= t <= first + warmup + seconds]
    start, end = inside[0][0], inside[-1][0]
    reads = inside[1:]
    window = end - start
    return Polled(
        read_ms=read * 1000,
        demand=sum(read / d.interval for d in config.devices),
        use=len(reads) * read / window,
        per_device=[sum(1 for _, u in reads if u == d.unit) / window for d in config.devices],
        counts=[sum(1 for _, u in reads if u == d.unit) for d in config.devices],
        wanted=[1 / d.interval for d in config.devices],
        failed=sum(p.stats.failed_polls for p in pollers),
    )


def polled(bauds: list[int], warmup: float, seconds: float) -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    print("scheduler (DevicePoller over Link): 100-register reads; line use = reads x line "
          "time / window; reads/s per device (its configured rate), [its reads in the window]")
    print(" baud  scenario                         read ms  demand  line use  failed  "
          "reads/s per device")
    for baud in bauds:
        with tempfile.TemporaryDirectory(prefix="m2m-bus-") as tmp:
            config = Path(tmp) / "bridge.yaml"
            write_polled_config(config, "/dev/null", baud, [])
            process, pty = start_simulator(config, baud)
            try:
                read = rtu_seconds(ReadRequest("holding", 0, REGISTERS, (), None), baud)
                for name, intervals in scenarios(read):
                    write_polled_config(config, pty, baud, intervals)
                    r = asyncio.run(measure_polled(config, warmup, seconds))
                    time.sleep(0.5)  # a read cut short by the scenario's end finishes on the wire
                    rates = " ".join(f"{got:.2f}({want:.2f})"
                                     for got, want in zip(r.per_device, r.wanted, strict=True))
                    counts = " ".join(str(c) for c in r.counts)
                    print(f"{baud:5d}  {name:31s}  {r.read_ms:7.1f}  {r.demand:6.0%}"
                          f"  {r.use:8.1%}  {r.failed:6d}  {rates}  [{counts}]", flush=True)
            finally:
                process.terminate()
                process.wait(10)
    print("target: line use >= 97% of the line whenever demand > 100% (issue 13), the "
          "devices' reads/s equal when their demands are")


def start_simulator(config: Path, baud: int) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "bridge", "--log-level", "warning", "simulate", "-c", str(config),
         "--baud", str(baud)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    found = re.fullmatch(r"rtu link rs485-1: connect to (\S+)\n", line)
    if found is None:
        process.kill()
        raise SystemExit(f"simulator did not announce its pty: {line!r}")
    return process, found[1]


async def measure(config_path: Path, seconds: float) -> dict[str, float]:
    config = load_config(config_path)
    link_config = config.link("rs485-1")
    assert isinstance(link_config, SerialLink)
    baud = link_config.baudrate
    link = build_links(config)["rs485-1"]
    work = []
    for device in config.devices:
        for group in plan_device(device.points, interval=device.interval,
                                 max_registers=link_config.max_registers,
                                 max_gap=link_config.max_gap):
            work.extend((device.unit, request) for request in group.requests)
    cycle_theory = sum(rtu_seconds(request, baud) for _, request in work)
    cycle_registers = sum(request.count for _, request in work)
    try:
        for unit, request in work:  # warm-up: open the port, first replies
            await link.read(unit, request)
        registers = transactions = errors = 0
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            for unit, request in work:
                try:
                    await link.read(unit, request)
                    registers += request.count
                except Exception:  # counted and reported: a bench must finish
                    errors += 1
                transactions += 1
        elapsed = time.monotonic() - start
    finally:
        link.close()
    achieved = registers / elapsed
    limit = cycle_registers / cycle_theory
    return {
        "baud": baud, "requests_per_cycle": len(work), "registers_per_cycle": cycle_registers,
        "cycle_ms_theory": cycle_theory * 1000,
        "cycle_ms_measured": elapsed / (transactions / len(work)) * 1000,
        "achieved": achieved, "limit": limit, "utilisation": achieved / limit,
        "transactions": transactions, "errors": errors,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baud", type=int, action="append", help="default: 9600 and 19200")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--meters", type=int, default=3)
    parser.add_argument("--polled", action="store_true",
                        help="the scheduler's scenarios (issue 13) instead of back-to-back reads")
    parser.add_argument("--warmup", type=float, default=2.0, help="--polled: seconds")
    args = parser.parse_args()
    bauds = args.baud or [9600, 19200]
    if args.polled:
        print(f"bench/bus.py --polled: {args.seconds:g} s per scenario after {args.warmup:g} s; "
              f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
              f"load {os.getloadavg()[0]:.2f}")
        polled(bauds, args.warmup, args.seconds)
        return
    print(f"bench/bus.py: {args.meters} x SDM630 ({MAP.name}) on one rtu link, 8N2, "
          f"{args.seconds:g} s per rate; Python {sys.version.split()[0]}, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
    print(" baud  req/cycle  regs/cycle  cycle ms (limit)  regs/s  limit regs/s  util  errors")
    for baud in bauds:
        with tempfile.TemporaryDirectory(prefix="m2m-bus-") as tmp:
            config = Path(tmp) / "bridge.yaml"
            write_config(config, "/dev/null", baud, args.meters)
            process, pty = start_simulator(config, baud)
            try:
                write_config(config, pty, baud, args.meters)
                r = asyncio.run(measure(config, args.seconds))
            finally:
                process.terminate()
                process.wait(10)
        print(f"{r['baud']:5.0f}  {r['requests_per_cycle']:9.0f}  {r['registers_per_cycle']:10.0f}"
              f"  {r['cycle_ms_measured']:7.1f} ({r['cycle_ms_theory']:6.1f})"
              f"  {r['achieved']:6.1f}  {r['limit']:12.1f}  {r['utilisation'] * 100:4.1f}%"
              f"  {r['errors']:6.0f}")
    print("target: utilisation >= 95% (issue 3)")


if __name__ == "__main__":
    main()
