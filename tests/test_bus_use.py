"""A work-conserving bus on a paced line (issue 13, item 0): the daemon's pollers over the
daemon's Link, against the simulator's RTU slave on a pty paced like a 19200-baud wire.

A device of 100 registers (126 ms of line time a read) polled every 100 ms, beside one polled
every second, ask for 138% of the line: the line must stay busy (at least 90% of it;
bench/bus.py --polled measures how close to 100% it gets) and the slow neighbour must keep its
rate. The grid used to leave the line idle after each overrunning poll until the next slot
(the fast device got a read every 200 ms: 63% of the line). Waits are for counts of reads,
with a generous deadline; the ratios are computed over the span the reads took, whatever the
machine's speed.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import yaml

from bridge.config import Config, SerialLink, load_config
from bridge.core.bustime import rtu_seconds
from bridge.core.planner import ReadRequest, plan_device
from bridge.poller import DevicePoller
from bridge.sim.serial import SerialSimulator
from bridge.sim.tcp import Simulator
from bridge.transports.link import Link, Priority
from bridge.transports.links import build_links
from tests.helpers import until

BAUD = 19200
REGISTERS = 100
READS = 60  # reads measured: ~7.5 s of line time


def _config(tmp_path: Path, port: Path, intervals: dict[int, str]) -> Config:
    path = tmp_path / "bridge.yaml"
    path.write_text(yaml.safe_dump({
        "version": 1,
        "gateway": {"id": "bus"},
        "links": [{"name": "rs485-1", "type": "rtu", "port": str(port), "baudrate": BAUD,
                   "parity": "N", "stopbits": 2, "timeout": "1s"}],
        "devices": [
            {"name": f"dev-{u}", "link": "rs485-1", "unit": u, "interval": interval,
             "points": [{"name": f"r{a}", "address": a} for a in range(REGISTERS)]}
            for u, interval in intervals.items()
        ],
    }))
    return load_config(path)


class Ends(Link):
    """The daemon's Link, noting when each successful read ended and for which unit."""

    def __init__(self, link: Link) -> None:
        super().__init__(link.client, silence=link.scheduler.silence)
        self.ends: list[tuple[float, int]] = []

    async def read(
        self, unit: int, request: ReadRequest, priority: Priority = Priority.POLL
    ) -> list[int]:
        words = await super().read(unit, request, priority)
        self.ends.append((time.monotonic(), unit))
        return words


@pytest.mark.integration
async def test_an_overloaded_paced_line_stays_busy_and_is_shared(tmp_path: Path) -> None:
    port = tmp_path / "sim" / "rs485-1"
    config = _config(tmp_path, port, {1: "100ms", 2: "1s"})
    link_config = config.link("rs485-1")
    assert isinstance(link_config, SerialLink)
    serial_sim = SerialSimulator(config, Simulator(config, seed=1), baud=BAUD,
                                 directory=tmp_path / "sim", seed=1)
    serial_sim.start()
    link = Ends(build_links(config)["rs485-1"])
    pollers = [
        DevicePoller(d, plan_device(d.points, interval=d.interval), link, config.mqtt,
                     emit=lambda _m: None, set_status=lambda _n, _up: None)
        for d in config.devices
    ]
    tasks = [asyncio.create_task(p.run()) for p in pollers]
    try:
        await until(lambda: len(link.ends) >= 5 + READS, timeout=60,
                    what=lambda: f"{5 + READS} reads, {len(link.ends)} done")
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        link.close()
        serial_sim.stop()
    (request,) = pollers[0].plan[0].requests
    read = rtu_seconds(request, BAUD)
    assert read == pytest.approx(0.126, abs=0.001)
    demand = sum(read / d.interval for d in config.devices)
    assert demand > 1.3
    # From the end of the 5th read (the port open, both devices going) to the end of the last.
    measured = link.ends[4:5 + READS]
    span = measured[-1][0] - measured[0][0]
    use = (len(measured) - 1) * read / span
    assert use >= 0.90, f"line use {use:.1%} over {span:.2f}s"
    slow = sum(1 for _, u in measured[1:] if u == 2)
    assert slow >= 0.8 * span - 1, f"the slow device read {slow} times in {span:.2f}s"
    assert sum(p.stats.failed_polls for p in pollers) == 0
