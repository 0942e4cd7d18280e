"""Bus utilisation: registers per second through the paced serial simulator vs the line's limit.

    .venv/bin/python bench/bus.py                        # 9600 and 19200 baud, 10 s each
    .venv/bin/python bench/bus.py --baud 9600 --seconds 30 --meters 5

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
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bridge.config import SerialLink, load_config  # noqa: E402
from bridge.core.bustime import rtu_seconds  # noqa: E402
from bridge.core.planner import plan_device  # noqa: E402
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
    args = parser.parse_args()
    bauds = args.baud or [9600, 19200]
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
