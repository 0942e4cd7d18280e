"""Daemon CPU time per published value, and its RSS (DESIGN.md "Performance model").

The setup DESIGN.md's targets are stated for: N units x M holding registers (uint16 points at
addresses 0..M-1, one device per unit, all on one tcp link), 1 s polls, a fast Modbus TCP device
(`m2m-bridge simulate` in its own process, so its CPU is not counted) and a private mosquitto on
127.0.0.1. Only the daemon's own CPU (utime + stime from /proc/PID/stat) is measured; the
subscriber that counts what arrives runs in this process.

    .venv/bin/python bench/pipeline.py                     # every mode, 3 runs each, 20 s windows
    .venv/bin/python bench/pipeline.py --mode per-device --seconds 10 --repeat 1

Modes: per-point and per-device JSON messages, and `sparkplug` (Sparkplug B DDATA, one
message per poll like per-device, counted by decoding each with bridge.core.sparkplug_pb2).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # for tests.helpers: the private mosquitto the e2e tests use

from bridge.core import sparkplug_pb2 as pb  # noqa: E402  (our generated Sparkplug B classes)

VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
PYTHON = str(VENV_PYTHON) if VENV_PYTHON.exists() else sys.executable
GATEWAY = "bench"
PREFIX = f"m2m/{GATEWAY}"
MODES = ("per-point", "per-device", "sparkplug")
TARGET_US = {"per-point": 9.0, "per-device": 3.0}  # DESIGN.md: CPU µs per value, at most
SPARKPLUG_GROUP = "bench-group"
SPARKPLUG_PREFIX = f"spBv1.0/{SPARKPLUG_GROUP}/DDATA/{GATEWAY}/"
TARGET_RSS_MIB = 35.0  # DESIGN.md: the whole daemon under this
INTERVAL = 1.0  # seconds between polls of every device
FIRST_VALUES_TIMEOUT = 30.0  # daemon start to the first value received
QUIET = 0.2  # no arrivals for this long = between two poll bursts
STOP_GRACE = 5.0  # SIGTERM, then SIGKILL after this many seconds
CLK_TCK = os.sysconf("SC_CLK_TCK")
NS_CPU = Path("/proc/self/schedstat").exists()  # cpu_seconds() counts nanoseconds, not ticks


# --- the config ---------------------------------------------------------------------------


def write_config(
    path: Path, *, broker: int, device: int, mode: str, units: int, registers: int, qos: int = 1
) -> Path:
    """`units` devices of `registers` uint16 holding points each, on one tcp link."""
    points = [{"name": f"r{a:03d}", "address": a, "type": "uint16"} for a in range(registers)]
    mqtt_settings: dict[str, Any] = {"host": "127.0.0.1", "port": broker, "qos": qos}
    if mode == "sparkplug":  # one DDATA per poll; NBIRTH/DBIRTH/DDATA go out at QoS 0 (spec)
        mqtt_settings |= {"format": "sparkplug", "sparkplug": {"group_id": SPARKPLUG_GROUP}}
    else:
        mqtt_settings["messages"] = mode
    doc: dict[str, Any] = {
        "version": 1,
        "gateway": {"id": GATEWAY, "state_dir": str(path.parent / "state")},
        "mqtt": mqtt_settings,
        "links": [{"name": "plc", "type": "tcp", "host": "127.0.0.1", "port": device,
                   "timeout": "1s"}],
        "devices": [
            {"name": f"unit-{unit:02d}", "link": "plc", "unit": unit, "interval": INTERVAL,
             "points": points}
            for unit in range(1, units + 1)
        ],
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


# --- /proc ----------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU of `pid` (all its threads) so far: the scheduler's nanoseconds per
    thread (/proc/PID/task/*/schedstat) where the kernel keeps them, else clock ticks (1/100 s,
    a few percent of a short window). A thread that ended takes its share out of the sum: the
    daemon's threads (DNS lookups) live as long as it does."""
    total, found = 0, False
    for stat_file in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int(stat_file.read_text().split()[0])
            found = True
    if found:
        return total / 1e9
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "; comm may hold spaces
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / CLK_TCK


def bytes_sent(pid: int, broker: int) -> int:
    """MQTT bytes `pid` has sent to the broker on 127.0.0.1:`broker` (the kernel's TCP
    `bytes_sent` of its connection, via `ss`: payload only, no TCP/IP headers)."""
    out = subprocess.run(
        ["ss", "-tinpH", "state", "established", f"( dport = :{broker} )"],
        capture_output=True, text=True, check=True,
    ).stdout
    total, ours = 0, False
    for line in out.splitlines():
        if not line.startswith(("\t", " ")):  # a socket's first line names its process
            ours = f"pid={pid}," in line
        elif ours:
            for field in line.split():
                if field.startswith("bytes_sent:"):
                    total += int(field.split(":", 1)[1])
    return total


def rss_mib(pid: int) -> float:
    """VmRSS of `pid` in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no VmRSS for pid {pid}")


# --- processes ------------------------------------------------------------------------------


def stop(process: subprocess.Popen[bytes] | None) -> None:
    """Terminate `process` by its id; kill it if it is still there after STOP_GRACE."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(STOP_GRACE)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def tail(path: Path, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


@contextlib.contextmanager
def process(
    args: list[str], log: Path, *, cwd: Path = ROOT, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """`args` as a child with stderr in `log`, stopped by its id on the way out."""
    with log.open("wb") as err:
        child = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err, cwd=cwd, env=env)
    try:
        yield child
    finally:
        stop(child)


@contextlib.contextmanager
def simulated_device(config: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    from tests.helpers import wait_for_port

    log = config.parent / "simulator.log"
    with process([PYTHON, "-m", "bridge", "--log-json", "simulate", "-c", str(config)],
                 log) as child:
        try:
            wait_for_port(port, timeout=30)
        except TimeoutError:
            raise RuntimeError(f"the simulator does not listen on {port}:\n{tail(log)}") from None
        yield child


# --- the subscriber -------------------------------------------------------------------------


def values_per_point(topic: str, payload: bytes) -> int:
    """One value a message on `m2m/bench/<device>/<point>` (status topics are not values)."""
    levels = topic.split("/")
    return 1 if len(levels) == 4 and levels[-1] != "status" else 0


def values_per_device(topic: str, payload: bytes) -> int:
    """The `values` of a message on `m2m/bench/<device>` (`m2m/bench/status` is not one)."""
    levels = topic.split("/")
    if len(levels) != 3 or levels[-1] == "status":
        return 0
    return len(json.loads(payload)["values"])


def values_sparkplug(topic: str, payload: bytes) -> int:
    """The metrics of a DDATA (births and deaths are not counted)."""
    if not topic.startswith(SPARKPLUG_PREFIX):
        return 0
    return len(pb.Payload.FromString(payload).metrics)


VALUES_IN: dict[str, Callable[[str, bytes], int]] = {
    "per-point": values_per_point,
    "per-device": values_per_device,
    "sparkplug": values_sparkplug,
}
TOPICS = [f"{PREFIX}/#", "spBv1.0/#"]  # what the daemon publishes, in every mode


class Counter:
    """Values received: `values_in(topic, payload)` says how many a message holds. paho's
    network thread counts, the bench reads."""

    def __init__(self, values_in: Callable[[str, bytes], int]) -> None:
        self.values_in = values_in
        self.values = 0
        self.last_arrival = 0.0  # time.monotonic() of the last counted message
        self._lock = threading.Lock()

    def count(self, topic: str, payload: bytes) -> None:
        n = self.values_in(topic, payload)
        if not n:
            return
        with self._lock:
            self.values += n
            self.last_arrival = time.monotonic()

    def on_message(self, client: mqtt.Client, message: mqtt.MQTTMessage) -> None:
        self.count(message.topic, bytes(message.payload))

    def snapshot(self) -> tuple[int, float]:
        with self._lock:
            return self.values, self.last_arrival


@contextlib.contextmanager
def subscriber(
    port: int, topics: list[str], on_message: Callable[[mqtt.Client, mqtt.MQTTMessage], None]
) -> Iterator[mqtt.Client]:
    """A paho client (its own network thread) subscribed to `topics` at QoS 0 (cheap for the
    broker and for this process), handing each message to `on_message`."""
    subscribed = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-{os.getpid()}",
                         protocol=MQTTProtocolVersion.MQTTv311)

    def on_connect(
        client: mqtt.Client, userdata: object, flags: mqtt.ConnectFlags, reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        client.subscribe([(topic, 0) for topic in topics])

    def on_subscribe(
        client: mqtt.Client, userdata: object, mid: int, reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        subscribed.set()

    def handle(client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        on_message(client, message)

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = handle
    client.connect("127.0.0.1", port, keepalive=60)
    client.loop_start()
    try:
        if not subscribed.wait(10):
            raise RuntimeError(f"could not subscribe on the broker at 127.0.0.1:{port}")
        yield client
    finally:
        client.disconnect()
        client.loop_stop()


# --- one run --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    mode: str
    seconds: float
    values: int
    cpu: float
    rss: float
    sent: int  # MQTT bytes to the broker in the window

    @property
    def bytes_per_value(self) -> float:
        return self.sent / self.values if self.values else math.nan

    @property
    def rate(self) -> float:
        return self.values / self.seconds

    @property
    def us_per_value(self) -> float:
        return self.cpu / self.values * 1e6 if self.values else math.nan

    @property
    def cpu_percent(self) -> float:
        return self.cpu / self.seconds * 100

    @property
    def ticks(self) -> int:
        return round(self.cpu * CLK_TCK)


def wait_quiet(counter: Counter, limit: float) -> None:
    """Return between two poll bursts, so a window of whole intervals holds whole polls."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        _, last = counter.snapshot()
        if time.monotonic() - last >= QUIET:
            return
        time.sleep(0.01)


def run_once(config: Path, broker: int, mode: str, warmup: float, seconds: float) -> Result:
    counter = Counter(VALUES_IN[mode])
    log = config.with_suffix(".log")
    with subscriber(broker, TOPICS, counter.on_message), process(
        [PYTHON, "-m", "bridge", "--log-json", "run", "-c", str(config)], log
    ) as daemon:
        deadline = time.monotonic() + FIRST_VALUES_TIMEOUT
        while counter.snapshot()[0] == 0:
            if daemon.poll() is not None:
                raise RuntimeError(f"the daemon exited ({daemon.returncode}):\n{tail(log)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no values within {FIRST_VALUES_TIMEOUT:g}s:\n{tail(log)}")
            time.sleep(0.05)
        time.sleep(warmup)
        wait_quiet(counter, limit=2 * INTERVAL)
        sent0 = bytes_sent(daemon.pid, broker)
        cpu0, (values0, _), t0 = cpu_seconds(daemon.pid), counter.snapshot(), time.monotonic()
        time.sleep(seconds)
        cpu1, (values1, _), t1 = cpu_seconds(daemon.pid), counter.snapshot(), time.monotonic()
        sent1 = bytes_sent(daemon.pid, broker)
        rss = rss_mib(daemon.pid)
        if daemon.poll() is not None:
            raise RuntimeError(f"the daemon exited ({daemon.returncode}):\n{tail(log)}")
    return Result(mode, t1 - t0, values1 - values0, cpu1 - cpu0, rss, sent1 - sent0)


# --- the whole benchmark --------------------------------------------------------------------


def fmt_us(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--mode", default="all",
                        help="a mode, or modes joined by commas (per-device,sparkplug), of "
                             f"{', '.join(MODES)}; all three (all, the default) or both JSON "
                             "modes (both)")
    parser.add_argument("--seconds", type=float, default=20.0,
                        help="measurement window per run (default 20)")
    parser.add_argument("--warmup", type=float, default=5.0,
                        help="seconds after the first value before measuring (default 5)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per mode (default 3)")
    parser.add_argument("--units", type=int, default=10, help="devices, unit ids 1..N (default 10)")
    parser.add_argument("--registers", type=int, default=100,
                        help="uint16 holding points per device, addresses 0..N-1 (default 100)")
    parser.add_argument("--max-inflight", type=int, default=20, metavar="N",
                        help="mosquitto's max_inflight_messages, the Receive Maximum it gives "
                             "the daemon: QoS 1 messages unacknowledged at once (its default 20)")
    parser.add_argument("--max-topic-alias", type=int, default=10, metavar="N",
                        help="MQTT 5 topic aliases mosquitto allows a client (its default 10; "
                             "per-point messages use one per topic while they last)")
    args = parser.parse_args(argv)
    if not 1 <= args.units <= 247:
        parser.error("--units must be 1..247 (Modbus unit ids)")
    if not 1 <= args.registers <= 65536:
        parser.error("--registers must be 1..65536")
    if args.repeat < 1 or args.seconds <= 0 or args.warmup < 0:
        parser.error("--repeat must be >= 1, --seconds > 0, --warmup >= 0")
    modes = (list(MODES) if args.mode == "all" else ["per-point", "per-device"]
             if args.mode == "both" else args.mode.split(","))
    if not modes or any(mode not in MODES for mode in modes):
        parser.error(f"--mode: {args.mode!r} is not all, both or modes of {', '.join(MODES)}")

    from tests.helpers import free_port, mosquitto

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"m2m-bridge pipeline bench: {args.units} units x {args.registers} uint16 holding "
          f"registers, {INTERVAL:g} s polls, qos 1, one tcp link, local mosquitto")
    print(f"expected {args.units * args.registers / INTERVAL:.0f} values/s; warm-up "
          f"{args.warmup:g} s, window {args.seconds:g} s, {args.repeat} run(s) per mode")
    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs, load average {load}")
    print()
    print(f"{'run':>3}  {'mode':<10}  {'values/s':>8}  {'µs/value':>8}  {'CPU %':>6}  "
          f"{'RSS MiB':>7}  {'B/value':>7}")
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="m2m-bench-") as tmp_name:
        tmp = Path(tmp_name)
        with mosquitto(tmp, f"max_topic_alias {args.max_topic_alias}\n"
                            f"max_inflight_messages {args.max_inflight}\n") as broker:
            device_port = free_port()
            configs = {
                mode: write_config(tmp / f"{mode}.yaml", broker=broker.port, device=device_port,
                                   mode=mode, units=args.units, registers=args.registers)
                for mode in modes
            }
            with simulated_device(configs[modes[0]], device_port):
                # Modes alternate run by run, so a change in machine load hits both alike.
                for run in range(1, args.repeat + 1):
                    for mode in modes:
                        r = run_once(configs[mode], broker.port, mode, args.warmup, args.seconds)
                        results.append(r)
                        print(f"{run:>3}  {mode:<10}  {r.rate:>8.1f}  "
                              f"{fmt_us(r.us_per_value):>8}  {r.cpu_percent:>6.2f}  "
                              f"{r.rss:>7.1f}  {r.bytes_per_value:>7.1f}", flush=True)
    fewest = min(results, key=lambda r: r.ticks)
    if not NS_CPU and fewest.ticks < 100:
        print(f"note: CPU time comes in 1/{CLK_TCK} s clock ticks; the {fewest.mode} window held "
              f"only {fewest.ticks}, so one tick is {100 / max(1, fewest.ticks):.0f}% of it: "
              f"use a longer --seconds or more --units")
    print()
    print(f"median of {args.repeat} run(s)   µs/value (target)     RSS MiB (target)   "
          f"MQTT bytes/value   µs/value vs per-device")
    medians = {
        mode: statistics.median(r.us_per_value for r in results if r.mode == mode)
        for mode in modes
    }
    for mode in modes:
        mine = [r for r in results if r.mode == mode]
        us = medians[mode]
        rss = statistics.median(r.rss for r in mine)
        sent = statistics.median(r.bytes_per_value for r in mine)
        target = f"<= {TARGET_US[mode]:g}" if mode in TARGET_US else "<= per-device"
        ratio = f"{us / medians['per-device']:.2f}x" if "per-device" in medians else "n/a"
        print(f"  {mode:<10}             {fmt_us(us):>8} ({target:<13})  "
              f"{rss:>7.1f} (< {TARGET_RSS_MIB:g})      {sent:>7.1f}            {ratio:>6}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
