"""m2m-bridge against the peers users would pick instead, side by side in one run (issue 13).

DESIGN.md "Performance model" states its CPU targets as ratios against modbus4mqtt 0.7.1 and the
ThingsBoard IoT Gateway 3.8.5, measured on one machine in one run, because absolute figures
drift 3x from day to day. This script installs both peers into their own virtualenvs under a
cache dir (benchmark-only: neither is ever a dependency of the package), then runs every
contender one after another on the same workload: `--units` devices of `--registers` uint16
holding registers behind one Modbus TCP device (`m2m-bridge simulate`, its own process, not
counted), 1 s polls, a private mosquitto on 127.0.0.1. For each it counts the values delivered
to a subscriber in this process and reads the CPU of the contender's whole process tree from
/proc over the window (utime + stime + cutime + cstime of each), then its RSS.

    .venv/bin/python bench/peers.py                           # every contender, 60 s windows
    .venv/bin/python bench/peers.py --window 20 --warmup 5    # a quicker look
    .venv/bin/python bench/peers.py --window 30 --warmup 5 --repeat 3   # medians of 3 rounds
    .venv/bin/python bench/peers.py --only modbus4mqtt,point-qos0

The ThingsBoard gateway sends nothing until its server answers the `getSessionLimits` RPC
(`v1/devices/me/rpc/request/<id>`); the subscriber answers it with no limits.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pipeline  # bench/pipeline.py: the config, the simulator, the subscriber, /proc helpers
import yaml
from pipeline import Counter, process, subscriber, tail

DEFAULT_CACHE = Path.home() / ".cache" / "m2m-bridge-bench"
MODBUS4MQTT = "modbus4mqtt==0.7.1"
THINGSBOARD = "thingsboard-gateway==3.8.5"
# modbus4mqtt 0.7.1 requires pymodbus >= 2.3, < 3 (its modbus_interface.py: until
# SungrowModbusTcpClient 0.1.7, which it imports, works with 3.x); 2.5.3 is the last 2.x.
# The gateway's Modbus connector pip-installs exactly pymodbus 3.9.2, pyserial and
# pyserial-asyncio when it is first loaded unless they are there already
# (connectors/modbus/modbus_connector.py), so they go in up front, outside any window.
PEER_REQUIREMENTS = {
    "modbus4mqtt": [MODBUS4MQTT, "pymodbus==2.5.3"],
    "thingsboard": [THINGSBOARD, "pymodbus==3.9.2", "pyserial", "pyserial-asyncio"],
}
INSTALLED = "bench-requirements.txt"  # in a venv: what pip installed there, once it succeeded
PIP_TIMEOUT = 900.0
FIRST_VALUES_TIMEOUT = 90.0  # start to the first value: the gateway takes a while
M4M_PREFIX = "m4m"
TB_TELEMETRY = "v1/gateway/telemetry"
TB_RPC_REQUEST = "v1/devices/me/rpc/request/"
TB_RPC_RESPONSE = "v1/devices/me/rpc/response/"
# What a ThingsBoard server without limits answers; the shape is what tb-mqtt-client 1.13.13's
# on_service_configuration and the gateway's __on_service_configuration read.
NO_LIMITS = {"messages": "0:0,", "telemetryMessages": "0:0,", "telemetryDataPoints": "0:0,"}
SESSION_LIMITS = {"maxPayloadSize": 65536, "maxInflightMessages": 100,
                  "rateLimits": NO_LIMITS, "gatewayRateLimits": NO_LIMITS}


class Unavailable(Exception):
    """A contender that cannot run here; the message says why."""


# --- the workload -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    tmp: Path
    broker: int
    device: int
    units: int
    registers: int
    cache: Path

    def device_name(self, unit: int) -> str:
        return f"unit-{unit:02d}"


@dataclass
class Launched:
    """A contender's processes, and the subscriber's view of what it delivers."""

    processes: list[subprocess.Popen[bytes]]
    logs: list[Path]
    counter: Counter
    topics: list[str]
    on_message: Callable[[mqtt.Client, mqtt.MQTTMessage], None] | None = None
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Contender:
    name: str  # for --only
    label: str  # the table's row
    ours: bool
    launch: Callable[[Workload, contextlib.ExitStack], Launched]
    floor: bool = False  # bench/floor.py: no product, the least any asyncio loop can spend


# --- peer virtualenvs ---------------------------------------------------------------------------


def peer_venv(cache: Path, peer: str) -> Path:
    """The venv for `peer` under `cache`, created and filled with its pinned requirements the
    first time; Unavailable with pip's last lines when that fails."""
    requirements = PEER_REQUIREMENTS[peer]
    venv = cache / requirements[0].replace("==", "-")
    marker = venv / INSTALLED
    wanted = "\n".join(requirements) + "\n"
    if marker.exists() and marker.read_text() == wanted:
        return venv
    cache.mkdir(parents=True, exist_ok=True)
    log = cache / f"{venv.name}.install.log"
    python3 = shutil.which("python3") or sys.executable
    print(f"installing {' '.join(requirements)} into {venv} (once; log {log})", flush=True)
    with log.open("wb") as out:
        for step in ([python3, "-m", "venv", str(venv)],
                     [str(venv / "bin" / "python"), "-m", "pip", "install",
                      "--disable-pip-version-check", *requirements]):
            try:
                code = subprocess.run(step, stdout=out, stderr=subprocess.STDOUT,
                                      timeout=PIP_TIMEOUT, check=False).returncode
            except subprocess.TimeoutExpired:
                code = -1
            if code != 0:
                raise Unavailable(f"`{' '.join(step[-3:])}` failed ({code}):\n{tail(log)}")
    marker.write_text(wanted)
    return venv


# --- counting -----------------------------------------------------------------------------------


def values_modbus4mqtt(topic: str, payload: bytes) -> int:
    """One value a message on `m4m/<device>/<register>` (not `m4m/modbus4mqtt`, its hello)."""
    return 1 if topic.startswith(f"{M4M_PREFIX}/") and topic.count("/") == 2 else 0


def values_thingsboard(topic: str, payload: bytes) -> int:
    """The keys of a `v1/gateway/telemetry` message: {device: [{"ts": .., "values": {..}}, ..]}
    (an entry without `values` is itself the values)."""
    if topic != TB_TELEMETRY:
        return 0
    n = 0
    for entries in json.loads(payload).values():
        for entry in entries if isinstance(entries, list) else [entries]:
            n += len(entry["values"]) if "values" in entry else len(entry) - ("ts" in entry)
    return n


def thingsboard_server(
    counter: Counter, notes: list[str]
) -> Callable[[mqtt.Client, mqtt.MQTTMessage], None]:
    """Count telemetry, and answer the gateway's RPCs to its server as ThingsBoard would:
    getSessionLimits with no limits, anything else with an error (each noted in `notes`)."""

    def on_message(client: mqtt.Client, message: mqtt.MQTTMessage) -> None:
        if not message.topic.startswith(TB_RPC_REQUEST):
            counter.count(message.topic, bytes(message.payload))
            return
        request_id = message.topic[len(TB_RPC_REQUEST):]
        method = json.loads(message.payload).get("method")
        answer: dict[str, Any] = (SESSION_LIMITS if method == "getSessionLimits"
                                  else {"error": f"{method} is not served by the bench"})
        client.publish(TB_RPC_RESPONSE + request_id, json.dumps(answer), qos=1)
        notes.append(f"answered the gateway's {method} RPC (request {request_id})")

    return on_message


# --- the contenders -----------------------------------------------------------------------------


def launch_modbus4mqtt(work: Workload, stack: contextlib.ExitStack) -> Launched:
    """One modbus4mqtt process per unit (it polls one device), a topic per register, QoS 0
    (it has no other), every value every poll (`pub_only_on_change: false`, as we publish)."""
    venv = peer_venv(work.cache, "modbus4mqtt")
    directory = work.tmp / "modbus4mqtt"
    directory.mkdir(exist_ok=True)
    processes, logs = [], []
    for unit in range(1, work.units + 1):
        device = work.device_name(unit)
        config = directory / f"{device}.yaml"
        config.write_text(yaml.safe_dump({
            "ip": "127.0.0.1", "port": work.device, "device_address": unit, "update_rate": 1,
            "scan_batching": min(100, work.registers),
            "registers": [{"pub_topic": f"{device}/r{a:03d}", "address": a,
                           "pub_only_on_change": False} for a in range(work.registers)],
        }, sort_keys=False))
        log = directory / f"{device}.log"
        processes.append(stack.enter_context(process(
            [str(venv / "bin" / "modbus4mqtt"), "--hostname", "127.0.0.1",
             "--port", str(work.broker), "--config", str(config),
             "--mqtt_topic_prefix", M4M_PREFIX], log, cwd=directory)))
        logs.append(log)
    return Launched(processes, logs, Counter(values_modbus4mqtt), [f"{M4M_PREFIX}/#"],
                    notes=["modbus4mqtt sleeps `update_rate` after each poll, so it polls a little "
                           "less often than once a second"])


def thingsboard_tags(work: Workload, ranged: bool) -> list[dict[str, Any]]:
    if ranged:  # one tag for the block, a key per register, read in one request
        return [{"tag": "r${address}", "type": "16uint", "functionCode": 3, "objectsCount": 1,
                 "address": f"0-{work.registers - 1}",
                 "maxRegistersPerRequest": min(125, work.registers)}]
    return [{"tag": f"r{a:03d}", "type": "16uint", "functionCode": 3, "objectsCount": 1,
             "address": a} for a in range(work.registers)]


def launch_thingsboard(work: Workload, stack: contextlib.ExitStack, *, ranged: bool) -> Launched:
    """One gateway with one Modbus connector of `--units` slaves, QoS 1 to its server (the
    shipped tb_gateway.json and logs.json, with statistics, remote shell and remote
    configuration off)."""
    venv = peer_venv(work.cache, "thingsboard")
    shipped = sorted(venv.glob("lib/python*/site-packages/thingsboard_gateway/config"))
    if not shipped:
        raise Unavailable(f"no thingsboard_gateway/config under {venv}")
    directory = work.tmp / ("tb-range" if ranged else "tb-tags")
    directory.mkdir(exist_ok=True)
    main = json.loads((shipped[0] / "tb_gateway.json").read_text())
    main["thingsboard"] |= {
        "host": "127.0.0.1", "port": work.broker, "remoteShell": False,
        "remoteConfiguration": False, "qos": 1,
        "security": {"type": "accessToken", "accessToken": "bench"},
        "statistics": {"enable": False, "enableCustom": False, "statsSendPeriodInSeconds": 3600,
                       "customStatsSendPeriodInSeconds": 3600},
    }
    main["grpc"] = {"enabled": False}
    main["connectors"] = [{"type": "modbus", "name": "Modbus", "configuration": "modbus.json"}]
    (directory / "tb_gateway.json").write_text(json.dumps(main, indent=2))
    # The shipped logging: INFO to ./logs/*.log and the console (here stderr, into our log),
    # ERROR for the rest (pymodbus 3.9.2 warns that BinaryPayloadDecoder is deprecated on every
    # decode; the shipped root level, ERROR, keeps that out of the logs).
    logs = json.loads((shipped[0] / "logs.json").read_text())
    logs["handlers"]["consoleHandler"]["stream"] = "ext://sys.stderr"
    (directory / "logs.json").write_text(json.dumps(logs, indent=2))
    (directory / "logs").mkdir(exist_ok=True)
    timeseries = thingsboard_tags(work, ranged)
    slaves = [{
        "host": "127.0.0.1", "port": work.device, "type": "tcp", "method": "socket",
        "unitId": unit, "deviceName": work.device_name(unit), "deviceType": "default",
        "timeout": 1, "byteOrder": "BIG", "wordOrder": "BIG", "retries": 1,
        "pollPeriod": int(pipeline.INTERVAL * 1000), "attributes": [],
        "timeseries": timeseries, "attributeUpdates": [], "rpc": [],
    } for unit in range(1, work.units + 1)]
    (directory / "modbus.json").write_text(json.dumps({"master": {"slaves": slaves}}, indent=2))
    env = {key: value for key, value in os.environ.items() if not key.startswith("TB_")}
    env["TB_GW_CONFIG_DIR"] = str(directory)
    log = directory / "gateway.log"
    gateway = stack.enter_context(process(
        [str(venv / "bin" / "thingsboard-gateway")], log, cwd=directory, env=env))
    counter = Counter(values_thingsboard)
    notes: list[str] = []
    return Launched([gateway], [log], counter, [TB_TELEMETRY, TB_RPC_REQUEST + "+"],
                    on_message=thingsboard_server(counter, notes), notes=notes)


def launch_ours(work: Workload, stack: contextlib.ExitStack, *, mode: str, qos: int) -> Launched:
    config = pipeline.write_config(work.tmp / f"m2m-{mode}-qos{qos}.yaml", broker=work.broker,
                                   device=work.device, mode=mode, units=work.units,
                                   registers=work.registers, qos=qos)
    log = config.with_suffix(".log")
    daemon = stack.enter_context(process(
        [pipeline.PYTHON, "-m", "bridge", "--log-json", "run", "-c", str(config)], log))
    return Launched([daemon], [log], Counter(pipeline.VALUES_IN[mode]), pipeline.TOPICS)


def launch_floor(work: Workload, stack: contextlib.ExitStack, *, mode: str) -> Launched:
    log = work.tmp / f"floor-{mode}.log"
    child = stack.enter_context(process(
        [pipeline.PYTHON, str(Path(__file__).with_name("floor.py")), "--mode", mode,
         "--units", str(work.units), "--registers", str(work.registers),
         "--serve", str(work.broker), str(work.device)], log))
    counted = "per-device" if mode == "per-device" else "per-point"
    return Launched([child], [log], Counter(pipeline.VALUES_IN[counted]), pipeline.TOPICS)


CONTENDERS = [
    Contender("modbus4mqtt", "modbus4mqtt 0.7.1 per-point QoS 0 (a process per unit)", False,
              launch_modbus4mqtt),
    Contender("tb-range", "ThingsBoard IoT Gateway 3.8.5 per-device range tags", False,
              lambda work, stack: launch_thingsboard(work, stack, ranged=True)),
    Contender("tb-tags", "ThingsBoard IoT Gateway 3.8.5 one tag per register", False,
              lambda work, stack: launch_thingsboard(work, stack, ranged=False)),
    Contender("point-qos0", "m2m-bridge per-point QoS 0", True,
              lambda work, stack: launch_ours(work, stack, mode="per-point", qos=0)),
    Contender("point-qos1", "m2m-bridge per-point QoS 1", True,
              lambda work, stack: launch_ours(work, stack, mode="per-point", qos=1)),
    Contender("device-qos1", "m2m-bridge per-device QoS 1", True,
              lambda work, stack: launch_ours(work, stack, mode="per-device", qos=1)),
    Contender("floor-point-qos0", "floor (bench/floor.py) per-point QoS 0", False,
              lambda work, stack: launch_floor(work, stack, mode="per-point-qos0"), floor=True),
    Contender("floor-point-qos1", "floor (bench/floor.py) per-point QoS 1", False,
              lambda work, stack: launch_floor(work, stack, mode="per-point-qos1"), floor=True),
    Contender("floor-device", "floor (bench/floor.py) per-device QoS 1", False,
              lambda work, stack: launch_floor(work, stack, mode="per-device"), floor=True),
]


# --- /proc: a process tree ------------------------------------------------------------------------


@dataclass(frozen=True)
class Proc:
    ppid: int
    ticks: int  # utime + stime + cutime + cstime: its own CPU and its reaped children's


def processes() -> dict[int, Proc]:
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):  # gone since the listing
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()  # comm may hold spaces
            # fields 4 and 14..17 of proc(5): ppid, utime, stime, cutime, cstime
            table[int(entry.name)] = Proc(int(fields[1]), sum(int(f) for f in fields[11:15]))
    return table


def tree(roots: list[int], table: dict[int, Proc]) -> list[int]:
    """`roots` and all their live descendants."""
    children: dict[int, list[int]] = {}
    for pid, proc in table.items():
        children.setdefault(proc.ppid, []).append(pid)
    found, todo = [], [pid for pid in roots if pid in table]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def tree_cpu(roots: list[int]) -> tuple[float, int]:
    """CPU seconds of the tree so far (a child that exited and was reaped is in its parent's
    cutime/cstime), and how many processes it has now."""
    table = processes()
    pids = tree(roots, table)
    return sum(table[pid].ticks for pid in pids) / pipeline.CLK_TCK, len(pids)


def tree_rss(roots: list[int]) -> list[float]:
    """VmRSS in MiB of each process of the tree."""
    sizes = []
    for pid in tree(roots, processes()):
        with contextlib.suppress(OSError, RuntimeError):  # gone, or a zombie without VmRSS
            sizes.append(pipeline.rss_mib(pid))
    return sizes


# --- one contender --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    contender: Contender
    seconds: float
    values: int
    cpu: float
    rss: list[float]  # MiB, a process each
    processes: int
    sent: int  # bytes the tree's sockets sent to the broker in the window

    @property
    def rate(self) -> float:
        return self.values / self.seconds

    @property
    def us_per_value(self) -> float:
        return self.cpu / self.values * 1e6 if self.values else math.nan

    @property
    def bytes_per_value(self) -> float:
        return self.sent / self.values if self.values else math.nan


def sent_to_broker(pids: list[int], broker: int) -> int:
    return sum(pipeline.bytes_sent(pid, broker) for pid in pids)


def check_alive(launched: Launched) -> None:
    for child, log in zip(launched.processes, launched.logs, strict=True):
        if child.poll() is not None:
            raise Unavailable(f"{log.stem} exited ({child.returncode}); {log}:\n{tail(log)}")


def run(contender: Contender, work: Workload, warmup: float, window: float) -> Result:
    with contextlib.ExitStack() as stack:
        launched = contender.launch(work, stack)
        counter = launched.counter
        stack.enter_context(subscriber(work.broker, launched.topics,
                                       launched.on_message or counter.on_message))
        deadline = time.monotonic() + FIRST_VALUES_TIMEOUT
        while counter.snapshot()[0] == 0:
            check_alive(launched)
            if time.monotonic() > deadline:
                raise Unavailable(f"no values within {FIRST_VALUES_TIMEOUT:g} s; "
                                  f"{launched.logs[0]}:\n{tail(launched.logs[0])}")
            time.sleep(0.1)
        time.sleep(warmup)
        pipeline.wait_quiet(counter, limit=2 * pipeline.INTERVAL)
        roots = [child.pid for child in launched.processes]
        pids = tree(roots, processes())
        sent0 = sent_to_broker(pids, work.broker)
        (cpu0, _), (values0, _), t0 = tree_cpu(roots), counter.snapshot(), time.monotonic()
        time.sleep(window)
        (cpu1, count), (values1, _), t1 = tree_cpu(roots), counter.snapshot(), time.monotonic()
        sent1 = sent_to_broker(pids, work.broker)
        rss = tree_rss(roots)
        check_alive(launched)
        for note in launched.notes:
            print(f"  note: {note}")
    return Result(contender, t1 - t0, values1 - values0, cpu1 - cpu0, rss, count, sent1 - sent0)


# --- the table -----------------------------------------------------------------------------------


def fmt(value: float, digits: int = 1) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


@dataclass(frozen=True)
class Row:
    """A contender's runs, summed up by their medians."""

    contender: Contender
    runs: list[Result]

    @property
    def us_per_value(self) -> float:
        return statistics.median(r.us_per_value for r in self.runs)

    @property
    def rate(self) -> float:
        return statistics.median(r.rate for r in self.runs)

    @property
    def bytes_per_value(self) -> float:
        return statistics.median(r.bytes_per_value for r in self.runs)

    @property
    def us_cell(self) -> str:
        us = [r.us_per_value for r in self.runs]
        spread = f" ({fmt(min(us))}-{fmt(max(us))})" if len(us) > 1 else ""
        return fmt(self.us_per_value) + spread

    @property
    def rss_cell(self) -> str:
        run = sorted(self.runs, key=lambda r: sum(r.rss))[len(self.runs) // 2]
        return rss_cell(run)


def rss_cell(result: Result) -> str:
    total = sum(result.rss)
    if len(result.rss) > 1:
        return f"{total:.1f} ({len(result.rss)} x {total / len(result.rss):.1f})"
    return f"{total:.1f}"


def print_table(rows: list[Row], failed: dict[str, str], expected: float) -> None:
    peers = [row for row in rows if not (row.contender.ours or row.contender.floor)]
    best = min(peers, key=lambda row: row.us_per_value, default=None)
    repeat = max((len(row.runs) for row in rows), default=1)
    print()
    if repeat > 1:
        print(f"medians of {repeat} runs (µs/value: lowest-highest)")
    print("| contender | values/s | µs/value | RSS MiB | B/value | best peer ÷ this |")
    print("|---|--:|--:|--:|--:|--:|")
    for row in rows:
        ratio = ("" if best is None or not (row.contender.ours or row.contender.floor)
                 else f"{best.us_per_value / row.us_per_value:.2f}x")
        print(f"| {row.contender.label} | {row.rate:.0f} | {row.us_cell} | {row.rss_cell} | "
              f"{fmt(row.bytes_per_value)} | {ratio} |")
    for name in failed:
        label = next(c.label for c in CONTENDERS if c.name == name)
        print(f"| {label} | did not run | | | | |")
    print()
    if best is not None:
        print(f"best peer: {best.contender.label}, {fmt(best.us_per_value)} µs/value; "
              f"\"best peer ÷ this\" > 1 means m2m-bridge spends less CPU per value")
    by_name = {row.contender.name: row for row in rows}
    targets = [  # DESIGN.md "Performance model": (ours, floor, the peer's best of, text, factor)
        ("point-qos0", "floor-point-qos0", ["modbus4mqtt"],
         "per-point QoS 0 at most 1/4 of modbus4mqtt's CPU per value", 4.0),
        ("point-qos1", "floor-point-qos1", ["modbus4mqtt"],
         "per-point QoS 1 at most 1/4 of modbus4mqtt's CPU per value", 4.0),
        ("device-qos1", "floor-device", ["tb-range", "tb-tags"],
         "per-device at least 30x cheaper than ThingsBoard's best", 30.0),
    ]
    for ours, floor, peer_names, text, factor in targets:
        theirs = [by_name[name].us_per_value for name in peer_names if name in by_name]
        if not theirs:
            continue
        if ours in by_name:
            times = min(theirs) / by_name[ours].us_per_value
            verdict = "met" if times >= factor else "not met"
            print(f"target: {text}: {times:.2f}x cheaper ({verdict})")
        if floor in by_name:  # the most any design could reach on this machine
            times = min(theirs) / by_name[floor].us_per_value
            print(f"  on this machine the floor is {times:.2f}x cheaper: the target is "
                  f"{'within reach' if times >= factor else 'below the floor'}")
    for row in rows:
        if row.rate < 0.9 * expected:
            print(f"note: {row.contender.name} delivered {row.rate:.0f} values/s of the "
                  f"{expected:.0f} polled; its µs/value is per value delivered")
    fewest = min((r for row in rows for r in row.runs), key=lambda r: r.cpu, default=None)
    if fewest is not None and fewest.cpu * pipeline.CLK_TCK < 100:
        print(f"note: CPU time comes in 1/{pipeline.CLK_TCK} s ticks; {fewest.contender.name} used "
              f"{fewest.cpu * pipeline.CLK_TCK:.0f} in a window: lengthen --window")
    for name, why in failed.items():
        print(f"\n{name} did not run: {why}")


# --- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    names = [c.name for c in CONTENDERS]
    parser.add_argument("--window", type=float, default=60.0,
                        help="measurement window per contender, seconds (default 60)")
    parser.add_argument("--warmup", type=float, default=10.0,
                        help="seconds after the first value before measuring (default 10)")
    parser.add_argument("--only", metavar="NAME[,NAME]",
                        help=f"run only these contenders, of: {', '.join(names)}")
    parser.add_argument("--units", type=int, default=10, help="devices, unit ids 1..N (default 10)")
    parser.add_argument("--registers", type=int, default=100,
                        help="uint16 holding registers per device, addresses 0..N-1 (default 100)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds of every contender, one after another; the table shows "
                             "medians (default 1)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help=f"where the peers' virtualenvs live (default {DEFAULT_CACHE})")
    args = parser.parse_args(argv)
    chosen = names if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        parser.error(f"unknown contender(s) {', '.join(unknown)}; choose from {', '.join(names)}")
    if not 1 <= args.units <= 247:
        parser.error("--units must be 1..247 (Modbus unit ids)")
    if not 1 <= args.registers <= 125:
        parser.error("--registers must be 1..125 (one read request a device)")
    if args.window <= 0 or args.warmup < 0 or args.repeat < 1:
        parser.error("--window must be > 0, --warmup >= 0, --repeat >= 1")

    from tests.helpers import free_port, mosquitto  # pipeline put the repository on sys.path

    expected = args.units * args.registers / pipeline.INTERVAL
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"peers bench: {args.units} units x {args.registers} uint16 holding registers, "
          f"{pipeline.INTERVAL:g} s polls, m2m-bridge simulate as the device, local mosquitto")
    print(f"expected {expected:.0f} values/s; warm-up {args.warmup:g} s, window {args.window:g} s "
          f"per contender; CPU and RSS of each contender's whole process tree")
    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs, load average {load}; "
          f"peers' venvs under {args.cache}")
    runs: dict[str, list[Result]] = {name: [] for name in chosen}
    failed: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="m2m-peers-") as tmp_name:
        tmp = Path(tmp_name)
        with mosquitto(tmp) as broker:
            device = free_port()
            served = pipeline.write_config(tmp / "device.yaml", broker=broker.port, device=device,
                                           mode="per-point", units=args.units,
                                           registers=args.registers)
            work = Workload(tmp, broker.port, device, args.units, args.registers, args.cache)
            with pipeline.simulated_device(served, device):
                for round_ in range(1, args.repeat + 1):
                    for contender in (c for c in CONTENDERS if c.name in chosen):
                        if contender.name in failed:
                            continue
                        print(f"{round_}/{args.repeat} {contender.name}: {contender.label} ...",
                              flush=True)
                        try:
                            r = run(contender, work, args.warmup, args.window)
                        except (Unavailable, OSError, RuntimeError, ValueError) as error:
                            failed[contender.name] = str(error)
                            print(f"  did not run: {str(error).splitlines()[0]}", flush=True)
                            continue
                        runs[contender.name].append(r)
                        print(f"  {r.rate:.0f} values/s, {fmt(r.us_per_value)} µs/value, "
                              f"{r.cpu / r.seconds * 100:.1f}% CPU, RSS {rss_cell(r)} MiB, "
                              f"{r.processes} process(es)", flush=True)
    rows = [Row(c, runs[c.name]) for c in CONTENDERS
            if c.name in chosen and c.name not in failed and runs[c.name]]
    print_table(rows, failed, expected)
    return 0


def interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    # Ctrl-C, and a SIGTERM too, unwind every `with`: the processes are stopped by their ids and
    # the temp dir removed. (A shell starts a background job with SIGINT ignored; undo that.)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, interrupt)
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # every process was stopped and the temp dir removed on the way
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
