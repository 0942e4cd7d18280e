"""RSS and CPU of the daemon over a long soak at gateway scale (DESIGN.md "Performance model").

500 devices x 30 points (issue 4, "Benchmark"): `--links` (10) tcp links x `--units` (50) unit
ids, each device 30 holding points (uint16 and float32 mixed, 40 registers, one read request a
poll), 1 s polls, QoS 1, a private mosquitto on 127.0.0.1, the buffer in a temp dir. The device
side is a minimal Modbus TCP slave in this file, run in its own process (so its CPU and memory
are not the daemon's) and listening on one port per link; before the daemon starts it is probed
for the read rate it sustains, and its own request rate is printed beside the daemon's figures
so a reader can see it kept up.

Every `--sample` (10) seconds: the daemon's VmRSS and CPU (/proc), and from its own Prometheus
endpoint (`metrics:` in the config, scraped over HTTP: no subscriber to pay for) messages
published, polls, and the buffer depth. At the end: RSS at 1 min and at the end, growth per
hour from a least-squares fit over the samples after the first minute, the buffer depth.

    .venv/bin/python bench/soak.py                          # 10 minutes, per-point messages
    .venv/bin/python bench/soak.py --minutes 2 --messages per-device
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import functools
import multiprocessing
import os
import platform
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # for tests.helpers: the private mosquitto the e2e tests use

from pipeline import cpu_seconds, stop, tail  # noqa: E402 - bench/ is this script's own folder

VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
PYTHON = str(VENV_PYTHON) if VENV_PYTHON.exists() else sys.executable
GATEWAY = "soak"
MODES = ("per-point", "per-device")
INTERVAL = 1.0  # seconds between polls of every device
POINTS = 30  # per device: every third one a float32 (2 registers), the rest uint16
TARGET_RSS_MIB = 40.0  # DESIGN.md: under this for 500 devices x 30 points, flat with uptime
FIRST_VALUES_TIMEOUT = 60.0  # daemon start to the first published message
STOP_GRACE = 5.0  # SIGTERM, then SIGKILL after this many seconds
PROBE_SECONDS = 2.0  # how long the slave's capacity is probed before the daemon starts


# --- the simulated device: a Modbus TCP slave on raw MBAP frames ---------------------------

MBAP = struct.Struct(">HHHB")  # transaction id, protocol id (0), length (unit + PDU), unit id
READ = struct.Struct(">BHH")  # function code, start address, quantity
MAX_READ = 125  # registers in one FC3/FC4 response (Modbus spec)
ILLEGAL_FUNCTION, ILLEGAL_DATA_VALUE = 1, 3


class SlaveProtocol(asyncio.Protocol):
    """One connection: answers FC3/FC4 for any unit, exception 01 for every other function.

    Each (port, unit) has a counter bumped by every read, and register `a` reads as
    0x4000 | ((counter + a) & 0x0FFF): values change every poll, and a float32 made of two
    such registers is always a finite normal number (exponent from the high word's 0x40xx).
    """

    def __init__(self, port: int, counters: dict[tuple[int, int], int],
                 requests: ctypes.c_ulonglong, exceptions: ctypes.c_ulonglong) -> None:
        self.port = port
        self.counters = counters
        self.requests = requests
        self.exceptions = exceptions
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        while len(buffer) >= MBAP.size:
            tid, protocol, length, unit = MBAP.unpack_from(buffer)
            if protocol != 0 or not 2 <= length <= 254:  # not Modbus: hang up, as devices do
                assert self.transport is not None
                self.transport.close()
                buffer.clear()
                return
            end = 6 + length
            if len(buffer) < end:
                return
            reply = self.answer(unit, bytes(buffer[MBAP.size : end]))
            del buffer[:end]
            self.requests.value += 1
            assert self.transport is not None
            self.transport.write(MBAP.pack(tid, 0, len(reply) + 1, unit) + reply)

    def answer(self, unit: int, pdu: bytes) -> bytes:
        function = pdu[0]
        if function not in (3, 4) or len(pdu) != READ.size:
            self.exceptions.value += 1
            return bytes((function | 0x80, ILLEGAL_FUNCTION))
        _, address, count = READ.unpack(pdu)
        if not 1 <= count <= MAX_READ or address + count > 65536:
            self.exceptions.value += 1
            return bytes((function | 0x80, ILLEGAL_DATA_VALUE))
        key = (self.port, unit)
        n = self.counters.get(key, 0) + 1
        self.counters[key] = n
        base = n + address
        registers = [0x4000 | ((base + i) & 0x0FFF) for i in range(count)]
        return struct.pack(f">BB{count}H", function, 2 * count, *registers)


def run_slave(ports: list[int], requests: ctypes.c_ulonglong,
              exceptions: ctypes.c_ulonglong) -> None:
    """The slave process: listen on 127.0.0.1 at every port until terminated."""

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        counters: dict[tuple[int, int], int] = {}
        servers = [
            await loop.create_server(
                functools.partial(SlaveProtocol, port, counters, requests, exceptions),
                "127.0.0.1", port,
            )
            for port in ports
        ]
        try:
            await asyncio.Event().wait()
        finally:
            for server in servers:
                server.close()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


@dataclass
class Slave:
    """The slave's process and its shared request counters."""

    process: BaseProcess
    requests: ctypes.c_ulonglong
    exceptions: ctypes.c_ulonglong

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return self.process.pid


@contextlib.contextmanager
def slave(ports: list[int]) -> Iterator[Slave]:
    """The slave in a spawned process (nothing of this one's state is inherited)."""
    from tests.helpers import wait_for_port

    context = multiprocessing.get_context("spawn")
    requests = context.RawValue(ctypes.c_ulonglong, 0)
    exceptions = context.RawValue(ctypes.c_ulonglong, 0)
    child = context.Process(target=run_slave, args=(ports, requests, exceptions),
                            name="soak-slave", daemon=True)
    child.start()
    try:
        for port in ports:
            wait_for_port(port, timeout=30)
        yield Slave(child, requests, exceptions)
    finally:
        if child.is_alive():
            child.terminate()  # SIGTERM to its pid
            child.join(STOP_GRACE)
            if child.is_alive():
                child.kill()
                child.join()


async def _probe(ports: list[int], seconds: float) -> int:
    """Reads answered in `seconds` by one client per port, each waiting for every reply.

    The client is Python in this process, so this is a lower bound on what the slave serves.
    """
    deadline = time.monotonic() + seconds

    async def client(port: int) -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        done, tid = 0, 0
        try:
            while time.monotonic() < deadline:
                tid = (tid + 1) & 0xFFFF
                writer.write(MBAP.pack(tid, 0, 6, 1) + READ.pack(3, 0, 40))
                header = await reader.readexactly(MBAP.size)
                await reader.readexactly(MBAP.unpack(header)[2] - 1)
                done += 1
        finally:
            writer.close()
            await writer.wait_closed()
        return done

    return sum(await asyncio.gather(*(client(port) for port in ports)))


# --- the config ----------------------------------------------------------------------------


def device_points() -> list[dict[str, Any]]:
    """30 points in one contiguous holding block: uint16, uint16, float32, ... (40 registers)."""
    points, address = [], 0
    for k in range(POINTS):
        kind = "float32" if k % 3 == 2 else "uint16"
        points.append({"name": f"p{k:02d}", "address": address, "type": kind})
        address += 2 if kind == "float32" else 1
    return points


def write_config(path: Path, *, broker: int, metrics: int, ports: list[int], units: int,
                 mode: str, qos: int = 1) -> Path:
    import yaml

    points = device_points()
    doc: dict[str, Any] = {
        "version": 1,
        "gateway": {"id": GATEWAY, "state_dir": str(path.parent / "state")},
        "mqtt": {"host": "127.0.0.1", "port": broker, "qos": qos, "messages": mode},
        "metrics": {"host": "127.0.0.1", "port": metrics},
        "links": [
            {"name": f"link-{i:02d}", "type": "tcp", "host": "127.0.0.1", "port": port,
             "timeout": "1s"}
            for i, port in enumerate(ports, 1)
        ],
        "devices": [
            {"name": f"dev-{i:02d}-{unit:02d}", "link": f"link-{i:02d}", "unit": unit,
             "interval": INTERVAL, "points": points}
            for i in range(1, len(ports) + 1)
            for unit in range(1, units + 1)
        ],
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


# --- /proc and the metrics endpoint --------------------------------------------------------


def status_mib(pid: int, key: str = "VmRSS") -> float:
    """A kB line of /proc/PID/status (VmRSS, VmHWM, RssAnon, ...) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} for pid {pid}")


def scrape(port: int) -> dict[str, float]:
    """Every sample of the daemon's /metrics, summed over labels, by metric name."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        totals[name] = totals.get(name, 0.0) + float(value)
    return totals


def baseline_rss(code: str) -> float:
    """VmRSS of a fresh interpreter after running `code`, in MiB."""
    report = ("import pathlib;print([l.split()[1] for l in pathlib.Path('/proc/self/status')"
              ".read_text().splitlines() if l.startswith('VmRSS:')][0])")
    out = subprocess.run([PYTHON, "-c", f"{code}\n{report}"], cwd=ROOT, capture_output=True,
                         text=True, check=True, timeout=60)
    return int(out.stdout.split()[-1]) / 1024


# --- processes -----------------------------------------------------------------------------


@contextlib.contextmanager
def daemon(config: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`m2m-bridge run` with its JSON log in CONFIG.log, stopped by its id on the way out."""
    log = config.with_suffix(".log")
    with log.open("wb") as err:
        child = subprocess.Popen(
            [PYTHON, "-m", "bridge", "--log-json", "run", "-c", str(config)],
            stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT,
        )
    try:
        yield child
    finally:
        stop(child)


# --- the soak ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    t: float  # seconds since the daemon started
    rss: float  # MiB
    cpu: float  # daemon CPU seconds so far
    published: float  # m2m_published_total
    polls: float  # m2m_polls_total, all devices
    failed: float  # m2m_poll_failures_total, all devices
    buffer: float  # m2m_buffer_messages
    slave_requests: int
    slave_cpu: float
    broker_cpu: float


def take_sample(start: float, pid: int, metrics: int, slave_: Slave, broker_pid: int) -> Sample:
    t = time.monotonic() - start
    scraped = scrape(metrics)
    return Sample(
        t=t, rss=status_mib(pid), cpu=cpu_seconds(pid),
        published=scraped.get("m2m_published_total", 0.0),
        polls=scraped.get("m2m_polls_total", 0.0),
        failed=scraped.get("m2m_poll_failures_total", 0.0),
        buffer=scraped.get("m2m_buffer_messages", 0.0),
        slave_requests=slave_.requests.value, slave_cpu=cpu_seconds(slave_.pid),
        broker_cpu=cpu_seconds(broker_pid),
    )


def clock(seconds: float) -> str:
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"


HEADER = (f"{'time':>5}  {'RSS MiB':>7}  {'CPU %':>6}  {'msgs/s':>7}  {'values/s':>8}  "
          f"{'polls/s':>7}  {'failed':>6}  {'buffer':>6}  {'slave req/s':>11}  "
          f"{'slave CPU %':>11}  {'broker CPU %':>12}")


def row(a: Sample, b: Sample, values_per_message: int) -> str:
    dt = b.t - a.t
    msgs = (b.published - a.published) / dt
    return (f"{clock(b.t):>5}  {b.rss:>7.1f}  {(b.cpu - a.cpu) / dt * 100:>6.1f}  "
            f"{msgs:>7.0f}  {msgs * values_per_message:>8.0f}  "
            f"{(b.polls - a.polls) / dt:>7.0f}  {b.failed - a.failed:>6.0f}  {b.buffer:>6.0f}  "
            f"{(b.slave_requests - a.slave_requests) / dt:>11.0f}  "
            f"{(b.slave_cpu - a.slave_cpu) / dt * 100:>11.1f}  "
            f"{(b.broker_cpu - a.broker_cpu) / dt * 100:>12.1f}")


def wait_first_message(child: subprocess.Popen[bytes], log: Path, metrics: int) -> None:
    deadline = time.monotonic() + FIRST_VALUES_TIMEOUT
    while True:
        if child.poll() is not None:
            raise RuntimeError(f"the daemon exited ({child.returncode}):\n{tail(log)}")
        with contextlib.suppress(OSError):
            if scrape(metrics).get("m2m_published_total", 0.0) > 0:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing published within {FIRST_VALUES_TIMEOUT:g}s:\n"
                               f"{tail(log)}")
        time.sleep(0.2)


def log_levels(log: Path) -> dict[str, int]:
    """Lines of the daemon's JSON log by level."""
    import json

    levels: dict[str, int] = {}
    with contextlib.suppress(OSError), log.open(errors="replace") as lines:
        for line in lines:
            try:
                level = str(json.loads(line).get("level", "?"))
            except (ValueError, AttributeError):
                level = "unparsed"
            levels[level] = levels.get(level, 0) + 1
    return levels


def summary(samples: list[Sample], devices: int) -> None:
    at_minute = min(samples, key=lambda s: abs(s.t - 60))
    late = [s for s in samples if s.t >= 60]
    print(f"RSS at {clock(at_minute.t)}: {at_minute.rss:.1f} MiB; at the end "
          f"({clock(samples[-1].t)}): {samples[-1].rss:.1f} MiB; "
          f"min/max after 1 min: {min(s.rss for s in late or samples):.1f}/"
          f"{max(s.rss for s in late or samples):.1f} MiB")
    if len(late) >= 3:
        fit = statistics.linear_regression([s.t for s in late], [s.rss for s in late])
        print(f"growth: {fit.slope * 3600:+.2f} MiB/hour (least-squares slope over the "
              f"{len(late)} samples after the first minute)")
    else:
        print("growth: n/a (fewer than 3 samples after the first minute; run longer)")
    print(f"target: under {TARGET_RSS_MIB:g} MiB RSS for 500 devices x 30 points, flat with "
          f"uptime (DESIGN.md; this run: {devices} devices x {POINTS} points)")
    depths = [s.buffer for s in late] or [samples[-1].buffer]
    print(f"buffer depth at the end: {samples[-1].buffer:.0f} messages (min/max after 1 min: "
          f"{min(depths):.0f}/{max(depths):.0f}; a snapshot, so up to one poll burst in "
          f"flight); poll failures over the run: {samples[-1].failed:.0f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--minutes", type=float, default=10.0, help="soak length (default 10)")
    parser.add_argument("--messages", choices=MODES, default="per-point",
                        help="mqtt.messages (default per-point, the heavier mode)")
    parser.add_argument("--qos", type=int, choices=(0, 1), default=1,
                        help="mqtt.qos (default 1; at 0 live polls are held in memory, "
                             "bridge.buffer.held)")
    parser.add_argument("--links", type=int, default=10,
                        help="tcp links, one slave port each (default 10)")
    parser.add_argument("--units", type=int, default=50,
                        help="devices per link, unit ids 1..N (default 50)")
    parser.add_argument("--sample", type=float, default=10.0,
                        help="seconds between samples (default 10)")
    args = parser.parse_args(argv)
    if not 1 <= args.units <= 247:
        parser.error("--units must be 1..247 (Modbus unit ids)")
    if args.links < 1 or args.minutes <= 0 or args.sample <= 0:
        parser.error("--links must be >= 1, --minutes > 0, --sample > 0")

    devices = args.links * args.units
    per_message = 1 if args.messages == "per-point" else POINTS
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"m2m-bridge soak: {args.links} tcp links x {args.units} units = {devices} devices x "
          f"{POINTS} points (uint16/float32, one 40-register holding read each), "
          f"{INTERVAL:g} s polls, {args.messages} messages, qos {args.qos}, local mosquitto")
    print(f"expected {devices / INTERVAL:.0f} reads/s, {devices * POINTS / INTERVAL:.0f} "
          f"values/s in {devices * POINTS // per_message / INTERVAL:.0f} messages/s; "
          f"{args.minutes:g} min, a sample every {args.sample:g} s")
    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs, load average {load}")
    bare, imported = baseline_rss("pass"), baseline_rss("import bridge.daemon")
    print(f"baseline RSS: python alone {bare:.1f} MiB, after `import bridge.daemon` "
          f"{imported:.1f} MiB")

    samples: list[Sample] = []
    with tempfile.TemporaryDirectory(prefix="m2m-soak-") as tmp_name:
        tmp = Path(tmp_name)
        log = tmp / "soak.log"
        try:
            soak(args, tmp, samples, imported)
        finally:
            levels = ", ".join(f"{k} {v}" for k, v in sorted(log_levels(log).items()))
            print(f"daemon log lines by level: {levels or 'none'}")
    return 0 if samples else 1


def soak(args: argparse.Namespace, tmp: Path, samples: list[Sample], imported: float) -> None:
    """Start the slave, the broker and the daemon; sample into `samples`; stop them all."""
    from tests.helpers import free_port, mosquitto

    devices = args.links * args.units
    per_message = 1 if args.messages == "per-point" else POINTS
    with contextlib.ExitStack() as stack:
        ports = [free_port() for _ in range(args.links)]
        device = stack.enter_context(slave(ports))
        probed = asyncio.run(_probe(ports, PROBE_SECONDS))
        rate = probed / PROBE_SECONDS
        print(f"slave (pid {device.pid}, its own process): served {rate:.0f} reads/s to a "
              f"Python client in {PROBE_SECONDS:g} s, {rate / (devices / INTERVAL):.0f}x "
              f"what the soak needs")
        broker = stack.enter_context(mosquitto(tmp))
        assert broker.process is not None
        metrics = free_port()
        config = write_config(tmp / "soak.yaml", broker=broker.port, metrics=metrics,
                              ports=ports, units=args.units, mode=args.messages, qos=args.qos)
        log = config.with_suffix(".log")
        start = time.monotonic()
        child = stack.enter_context(daemon(config))
        wait_first_message(child, log, metrics)
        print(f"daemon pid {child.pid}: first message after {time.monotonic() - start:.1f} s")
        print()
        print(HEADER, flush=True)
        previous = take_sample(start, child.pid, metrics, device, broker.process.pid)
        end = start + args.minutes * 60
        next_at = start + args.sample * (int(previous.t // args.sample) + 1)
        while next_at <= end + 1e-6:
            time.sleep(max(0.0, next_at - time.monotonic()))
            if child.poll() is not None:
                raise RuntimeError(f"the daemon exited ({child.returncode}):\n{tail(log)}")
            if not device.process.is_alive():
                raise RuntimeError("the slave process died")
            sample = take_sample(start, child.pid, metrics, device, broker.process.pid)
            print(row(previous, sample, per_message), flush=True)
            samples.append(sample)
            previous = sample
            next_at += args.sample
        peak = status_mib(child.pid, "VmHWM")
        anon = status_mib(child.pid, "RssAnon")
        files = status_mib(child.pid, "RssFile")
        print()
        if not samples:
            print("no samples: --minutes shorter than --sample")
            return
        summary(samples, devices)
        print(f"daemon at the end: RssAnon {anon:.1f} MiB + RssFile {files:.1f} MiB; peak "
              f"VmHWM {peak:.1f} MiB; {samples[-1].rss - imported:+.1f} MiB over "
              f"`import bridge.daemon`")
        print(f"slave: {device.requests.value} requests, {device.exceptions.value} exceptions "
              f"over the run")


if __name__ == "__main__":
    sys.exit(main())
