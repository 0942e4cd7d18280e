"""Where the daemon's resident memory goes (DESIGN.md "Performance model": under 35 MiB RSS at
10 units x 100 registers, under 45 MiB at 500 devices x 30 points).

    .venv/bin/python bench/rss.py imports                 # what each package adds, cumulatively
    .venv/bin/python bench/rss.py daemon                  # the live daemon, every mode, after 30 s
    .venv/bin/python bench/rss.py daemon --units 500 --registers 30 --mode per-device
    .venv/bin/python bench/rss.py daemon --env MALLOC_ARENA_MAX=2   # an environment setting
    .venv/bin/python bench/rss.py heap                    # tracemalloc: the Python heap by file

`imports`: a fresh interpreter per step imports every step's modules up to that one, in the
order the daemon loads them (structlog with rich hidden, as bridge.logs does), and prints its
VmRSS, RssAnon (heap, stacks) and RssFile (shared libraries and mapped files); the last steps
get a 10 x 100 config from the loader's child, as the daemon does, and build the Service from
it (the model instances and the plans).
Steps are cumulative, so each delta is what that package adds over what came before.

`daemon`: mosquitto, the simulator and `m2m-bridge run` as bench/pipeline.py starts them; after
`--seconds` (30) of polling it prints VmRSS, /proc/PID/smaps_rollup and the resident memory of
each mapping of /proc/PID/smaps summed by file ([heap], [anon], each shared library), and the
daemon's threads. `heap`: the same daemon with tracemalloc on from interpreter start (which
costs RSS of its own: only the Python-heap figures mean anything), a snapshot after `--seconds`
grouped by the file that allocated. Nothing is asserted; figures are printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pipeline  # bench/pipeline.py: the config, the simulator, the subscriber, /proc helpers
import yaml
from pipeline import PYTHON, ROOT, Counter, process, subscriber, tail

MIB = 1024 * 1024

# --- imports, step by step ------------------------------------------------------------------

# (label, code) in the order `m2m-bridge run` loads them; each step runs after all before it.
STEPS: list[tuple[str, str]] = [
    ("python (venv site)", "pass"),
    ("bridge.cli (argparse, json, our errors)", "import bridge.cli"),
    ("asyncio (ssl, socket, selectors)", "import asyncio"),
    ("structlog (bridge.logs: rich hidden)", "import bridge.logs"),
    ("pymodbus.client (+ pyserial)", "import pymodbus.client"),
    ("sqlite3 + bridge.buffer", "import bridge.buffer"),
    ("mqtt5 + bridge.mqtt.wire", "import bridge.mqtt.wire"),
    ("aiomqtt (paho)", "import aiomqtt"),
    ("protobuf + bridge.core.sparkplug_pb2", "import bridge.core.sparkplug_pb2"),
    ("prometheus_client", "import prometheus_client"),
    ("bridge.daemon (the rest of ours)", "import bridge.daemon"),
    ("config 10 x 100 from the loader's child (frozen: no pydantic)",
     "import bridge.config.apart; config = bridge.config.apart.load_config_apart(PATH)"),
    ("Service built", "import bridge.service; service = bridge.service.Service(config)"),
    ("gc.collect() + malloc_trim(0)",
     "import gc, ctypes; gc.collect(); ctypes.CDLL('libc.so.6').malloc_trim(0)"),
]

REPORT = """
import sys
def _status():
    fields = {}
    for line in open('/proc/self/status'):
        key, _, value = line.partition(':')
        if key in ('VmRSS', 'RssAnon', 'RssFile'):
            fields[key] = int(value.split()[0]) / 1024
    return fields
print(_status()['VmRSS'], _status()['RssAnon'], _status()['RssFile'], len(sys.modules))
"""


def step_rss(codes: list[str], config: Path) -> tuple[float, float, float, int]:
    """(VmRSS, RssAnon, RssFile in MiB, modules) of a fresh interpreter that ran `codes`."""
    source = f"PATH = {str(config)!r}\n" + "\n".join(codes) + "\n" + REPORT
    out = subprocess.run([PYTHON, "-c", source], check=False, capture_output=True, text=True,
                         cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    rss, anon, file, modules = out.stdout.split()
    return float(rss), float(anon), float(file), int(modules)


def imports(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="m2m-rss-") as tmp_name:
        tmp = Path(tmp_name)
        config = write_config(tmp / "bridge.yaml", broker=1883, ports=[5020], units=10,
                              registers=100, mode="per-device")
        print(f"cumulative imports, a fresh interpreter per step, median of {args.repeat}")
        print(f"{'step':<52} {'RSS':>6} {'delta':>6} {'anon':>6} {'file':>6} {'modules':>7}")
        before = 0.0
        for index, (label, _) in enumerate(STEPS):
            codes = [code for _, code in STEPS[: index + 1]]
            runs = [step_rss(codes, config) for _ in range(args.repeat)]
            rss = statistics.median(r[0] for r in runs)
            anon = statistics.median(r[1] for r in runs)
            file = statistics.median(r[2] for r in runs)
            print(f"{label:<52} {rss:6.1f} {rss - before:+6.1f} {anon:6.1f} {file:6.1f} "
                  f"{runs[0][3]:7d}")
            before = rss


# --- the live daemon ------------------------------------------------------------------------


def write_config(
    path: Path, *, broker: int, ports: list[int], units: int, registers: int, mode: str,
) -> Path:
    """bench/pipeline.py's config, for any number of devices: 247 unit ids a tcp link, one
    link (and one simulated endpoint) per 247 devices."""
    pipeline.write_config(path, broker=broker, device=ports[0], mode=mode, units=1,
                          registers=registers)
    doc: dict[str, Any] = yaml.safe_load(path.read_text())
    template_link, template_device = doc["links"][0], doc["devices"][0]
    doc["links"] = [template_link | {"name": f"plc{i}", "port": port}
                    for i, port in enumerate(ports)]
    doc["devices"] = [
        template_device | {"name": f"unit-{n:03d}", "link": f"plc{n // 247}", "unit": n % 247 + 1}
        for n in range(units)
    ]
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def status(pid: int) -> dict[str, float]:
    """VmRSS, RssAnon, RssFile, Threads of `pid` (MiB, threads a count)."""
    fields: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) / 1024
        elif key == "Threads":
            fields[key] = int(value)
    return fields


def smaps_rollup(pid: int) -> dict[str, float]:
    """/proc/PID/smaps_rollup's kB lines, in MiB."""
    rollup: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, value = line.partition(":")
        if value.strip().endswith("kB"):
            rollup[key] = int(value.split()[0]) / 1024
    return rollup


def rss_by_mapping(pid: int) -> dict[str, float]:
    """Resident MiB of each mapped file ([heap], [stack] and anonymous mappings by name)."""
    by_file: dict[str, float] = defaultdict(float)
    name = "[anon]"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split(maxsplit=5)
        if len(head) >= 5 and "-" in head[0] and ":" not in head[0]:  # a mapping's first line
            name = head[5] if len(head) == 6 else "[anon]"
        elif line.startswith("Rss:"):
            by_file[name] += int(line.split()[1]) / 1024
    return dict(by_file)


def short(path: str) -> str:
    """A mapping's file, short: site-packages/<pkg>/..., lib-dynload/<mod>, or the base name."""
    for marker in ("site-packages/", "lib-dynload/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return os.path.basename(path) if path.startswith("/") else path


def run_daemon(
    args: argparse.Namespace, mode: str, env: dict[str, str], tmp: Path, *, broker: int,
    ports: list[int],
) -> None:
    """Start the daemon on `mode`'s config, wait for values and `--seconds`; print its memory
    (and its heap, for `heap`), then stop it."""
    config = write_config(tmp / f"{mode}.yaml", broker=broker, ports=ports, units=args.units,
                          registers=args.registers, mode=mode)
    counter = Counter(pipeline.VALUES_IN[mode])
    log = config.with_suffix(".log")
    with subscriber(broker, pipeline.TOPICS, counter.on_message), process(
        [PYTHON, "-m", "bridge", "--log-json", "run", "-c", str(config)], log,
        env=os.environ | env,
    ) as daemon:
        started = time.monotonic()
        while counter.snapshot()[0] == 0:
            if daemon.poll() is not None or time.monotonic() - started > 60:
                raise RuntimeError(f"no values from the daemon:\n{tail(log)}")
            time.sleep(0.05)
        time.sleep(max(0.0, args.seconds - (time.monotonic() - started)))
        values = counter.snapshot()[0]
        report(daemon.pid, mode, values, time.monotonic() - started, args.top)
        if args.command == "heap":
            heap(daemon.pid, tmp, args.top)


def report(pid: int, mode: str, values: int, seconds: float, top: int) -> None:
    st, rollup, maps = status(pid), smaps_rollup(pid), rss_by_mapping(pid)
    print(f"\n{mode}: {values} values received in {seconds:.0f} s; VmRSS {st['VmRSS']:.1f} MiB "
          f"(anon {st['RssAnon']:.1f}, file {st['RssFile']:.1f}), {st['Threads']:.0f} threads")
    print("  smaps_rollup: " + ", ".join(
        f"{key} {rollup[key]:.1f}" for key in
        ("Rss", "Pss", "Shared_Clean", "Private_Clean", "Private_Dirty", "Anonymous")
        if key in rollup
    ))
    ranked = sorted(maps.items(), key=lambda item: -item[1])
    shown = ranked[:top]
    print(f"  resident MiB by mapping (top {len(shown)} of {len(ranked)}):")
    for name, mib in shown:
        print(f"    {mib:6.2f}  {short(name)}")
    rest = sum(mib for _, mib in ranked[top:])
    print(f"    {rest:6.2f}  ({len(ranked) - len(shown)} others)")


# --- tracemalloc ----------------------------------------------------------------------------

# Started in every interpreter of the run (a sitecustomize): tracemalloc from the first
# allocation; SIGUSR1 writes a snapshot's statistics by file to $RSS_HEAP_OUT.
HEAP_SITE = """\
import os, signal, tracemalloc
tracemalloc.start(1)
def _dump(*_):
    stats = tracemalloc.take_snapshot().statistics("filename")
    with open(os.environ["RSS_HEAP_OUT"], "w") as out:
        for s in stats:
            out.write(f"{s.size}\\t{s.count}\\t{s.traceback[0].filename}\\n")
if "RSS_HEAP_OUT" in os.environ:
    signal.signal(signal.SIGUSR1, _dump)
"""


def heap_env(tmp: Path) -> dict[str, str]:
    site = tmp / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(HEAP_SITE)
    return {"PYTHONPATH": str(site), "RSS_HEAP_OUT": str(tmp / "heap.tsv")}


def owner(filename: str) -> str:
    """Who a file belongs to: bridge.<module>, a site-package, stdlib:<module>, or as is."""
    if "/bridge/" in filename:
        return "bridge." + filename.rsplit("/bridge/", 1)[1].removesuffix(".py").replace("/", ".")
    if "site-packages/" in filename:
        return filename.split("site-packages/", 1)[1].split("/", 1)[0]
    if filename.startswith("<frozen importlib"):
        return "module code (marshal, importlib)"
    if "/lib/python3" in filename:
        return "stdlib:" + filename.rsplit("/", 1)[1].removesuffix(".py")
    return filename


def heap(pid: int, tmp: Path, top: int) -> None:
    out = tmp / "heap.tsv"
    out.unlink(missing_ok=True)
    os.kill(pid, 10)  # SIGUSR1: the sitecustomize writes the snapshot
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        time.sleep(0.2)
        text = out.read_text() if out.exists() else ""
        if text.endswith("\n") and text.count("\n") > 10:
            break
    by_owner: dict[str, int] = defaultdict(int)
    total = 0
    for line in text.splitlines():
        size, _, filename = line.split("\t")
        by_owner[owner(filename)] += int(size)
        total += int(size)
    print(f"  Python heap (tracemalloc) {total / MIB:.1f} MiB, by the file that allocated:")
    ranked = sorted(by_owner.items(), key=lambda item: -item[1])
    for name, size in ranked[:top]:
        print(f"    {size / MIB:6.2f}  {name}")
    print(f"    {sum(s for _, s in ranked[top:]) / MIB:6.2f}  ({len(ranked) - top} others)")


# --- the whole bench ------------------------------------------------------------------------


def daemons(args: argparse.Namespace) -> None:
    from tests.helpers import free_port, mosquitto, wait_for_port

    env = dict(item.split("=", 1) for item in args.env)
    modes = pipeline.MODES if args.mode == "all" else (args.mode,)
    print(f"m2m-bridge daemon memory: {args.units} devices x {args.registers} uint16 points, "
          f"1 s polls, after {args.seconds:g} s; env {env or 'as is'}")
    with tempfile.TemporaryDirectory(prefix="m2m-rss-") as tmp_name:
        tmp = Path(tmp_name)
        if args.command == "heap":
            env |= heap_env(tmp)
        ports = [free_port() for _ in range((args.units + 246) // 247)]
        with mosquitto(tmp) as broker:
            sim_config = write_config(tmp / "simulator.yaml", broker=broker.port, ports=ports,
                                      units=args.units, registers=args.registers,
                                      mode="per-device")
            log = tmp / "simulator.log"
            with process([PYTHON, "-m", "bridge", "--log-json", "simulate", "-c",
                          str(sim_config)], log):
                for port in ports:
                    # pymodbus builds each simulated device's blocks in Python: 500 devices
                    # take ~45 s to serve here, more on a loaded machine.
                    wait_for_port(port, timeout=300)
                for mode in modes:
                    run_daemon(args, mode, env, tmp, broker=broker.port, ports=ports)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.dedent(__doc__ or "").split("\n", 2)[2],
    )
    parser.add_argument("command", choices=["imports", "daemon", "heap"])
    parser.add_argument("--repeat", type=int, default=3, help="imports: runs per step (3)")
    parser.add_argument("--mode", choices=[*pipeline.MODES, "all"], default="all")
    parser.add_argument("--units", type=int, default=10, help="devices (10)")
    parser.add_argument("--registers", type=int, default=100, help="points a device (100)")
    parser.add_argument("--seconds", type=float, default=30.0,
                        help="from daemon start to the measurement (30)")
    parser.add_argument("--top", type=int, default=12, help="mappings or heap owners shown (12)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="set in the daemon's environment (repeatable)")
    args = parser.parse_args(argv)
    if any("=" not in item for item in args.env):
        parser.error("--env takes KEY=VALUE")
    if args.command == "imports":
        imports(args)
    else:
        daemons(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
