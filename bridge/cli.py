"""`m2m-bridge`: the daemon, config checks, one-off reads, the simulator and the demo.

Exit codes (DESIGN.md): 0 ok, 1 the device or broker failed, 2 usage, 78 config error
(EX_CONFIG from sysexits.h, which systemd's RestartPreventExitStatus= users know).
Expected failures print one line on stderr, never a traceback.

Each command imports what it needs at the top of its `_cmd_*` function, never here: the parser
and `--help` load no pydantic, pymodbus, aiomqtt or prometheus_client, and `read URL` none of
the config models (DESIGN.md: `--help` under 100 ms, a one-off `read` under 150 ms).
tests/test_cli_imports.py holds each command to that.
"""
# ruff: noqa: PLC0415 - the imports inside functions are the point (see above)

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from bridge import __version__
from bridge.errors import BridgeError, ConfigError, UsageError
from bridge.registers import BYTE_ORDERS, POINT_TYPES
from bridge.tools import argtypes

if TYPE_CHECKING:
    from bridge.config import Config
    from bridge.registers import Value

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CONFIG = 0, 1, 2, 78


class _Sized(argparse.HelpFormatter):
    """argparse's formatter, sized as argparse does it (COLUMNS, else the terminal, minus 2)
    without `shutil.get_terminal_size`: argparse makes a formatter for every argument added,
    and shutil brings zlib, bz2 and lzma into every command and the daemon (0.5 MiB of RSS)."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        if width is None:
            try:
                columns = int(os.environ.get("COLUMNS", ""))
            except ValueError:
                columns = 0
            if columns <= 0:
                try:
                    columns = os.get_terminal_size(sys.__stdout__.fileno()).columns or 80  # type: ignore[union-attr]
                except (AttributeError, ValueError, OSError):
                    columns = 80  # not a terminal: shutil's fallback
            width = columns - 2
        super().__init__(prog, indent_increment, max_help_position, width)


class _RawSized(_Sized, argparse.RawDescriptionHelpFormatter):
    """A command's help: its description and example as written."""


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Sized)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"m2m-bridge: {message} (see '{self.prog} --help')\n")


def _load(path: Path, *, check_state_dir: bool = False, apart: bool = False) -> Config:
    """The config at `path`; from here on its secret values never reach output or logs.
    `apart`: read in a child process, whose load peak the daemon need not keep
    (bridge.config.apart)."""
    from bridge.logs import redact_secrets

    if apart:
        from bridge.config.apart import load_config_apart

        config = load_config_apart(path, check_state_dir=check_state_dir)
    else:
        from bridge.config import load_config

        config = load_config(path, check_state_dir=check_state_dir)
    redact_secrets(config.secrets)
    return config


def _fail(message: str, code: int = EXIT_FAILED) -> int:
    from bridge.logs import redact

    print(f"m2m-bridge: {redact(message)}", file=sys.stderr)
    return code


def _log_args(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument("--log-level", default=default,
                        choices=["debug", "info", "warning", "error"],
                        help="default: info for run and simulate, warning for the rest")
    parser.add_argument("--log-json", action="store_true", default=default,
                        help="JSON log lines even on a terminal (default: JSON when not a tty)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="m2m-bridge", description=__doc__.splitlines()[0] if __doc__ else None,
                     epilog="example: m2m-bridge --log-level debug validate -c configs/bridge.yaml")
    parser.add_argument("--version", action="version", version=f"m2m-bridge {__version__}")
    _log_args(parser, None)
    # The same options after the command (`m2m-bridge read … --log-level debug`): SUPPRESS keeps
    # the subparser from overwriting a value given before the command with its own default.
    log_options = _Parser(add_help=False)
    _log_args(log_options, argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser,
                                title="commands", metavar="COMMAND",
                                help="see 'm2m-bridge COMMAND --help'")

    def command(name: str, help_: str, example: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_, description=help_, epilog=f"example: {example}",
                              formatter_class=_RawSized,
                              parents=[log_options])

    def config_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("-c", "--config", required=True, type=Path, help="bridge YAML file")

    config_arg(command("run", "run the daemon in the foreground (systemd Type=notify)",
                       "m2m-bridge run -c /etc/m2m-bridge/bridge.yaml"))
    config_arg(command("validate", "check a config; exit 0, or 78 listing every error",
                       "m2m-bridge validate -c configs/bridge.yaml"))
    command("schema", "print the JSON Schema of the config format", "m2m-bridge schema > s.json")
    config_arg(command("plan", "show the read requests per device and the registers they span",
                       "m2m-bridge plan -c configs/bridge.yaml"))

    read = command(
        "read", "read registers once, from a URL or a configured device",
        "m2m-bridge read tcp://127.0.0.1:5020 --unit 1 --table input --address 0 "
        "--type float32 --count 3\n"
        "         m2m-bridge read -c configs/bridge.yaml meter-1 voltage_l1",
    )
    _device_args(read, tables=["holding", "input", "coil", "discrete"])
    read.add_argument("points", nargs="*", help="with -c: point names (default: all)")
    read.add_argument("--address", type=int, default=None,
                      help="0-based PDU address (required with a URL)")
    read.add_argument("--count", type=int, default=1,
                      help="how many values of --type (default 1); with --type string, the "
                           "registers of one string, 2 characters each")
    read.add_argument("--json", action="store_true", help="print JSON instead of a table")

    write = command(
        "write", "write one value, to a URL or a configured point, and print its read-back",
        "m2m-bridge write tcp://127.0.0.1:5020 --unit 1 --table holding --address 50 "
        "--type float32 42.5\n"
        "         m2m-bridge write -c configs/bridge.yaml pump-1 speed_setpoint 1450",
    )
    _device_args(write, tables=["holding", "coil"])
    write.add_argument("rest", nargs="+", metavar="VALUE",
                       help="with -c: POINT VALUE; with a URL: VALUE (as on a /set topic: "
                            "42.5, true, on, running, '\"text\"')")
    write.add_argument("--address", type=int, default=None,
                       help="0-based PDU address (required with a URL)")

    sim = command("simulate", "serve the configured devices as Modbus slaves (serial links "
                  "and line instruments on ptys), one library map or a SunSpec inverter",
                  "m2m-bridge simulate -c configs/bridge.yaml --baud 9600\n"
                  "         m2m-bridge simulate --map library:eastron-sdm630 --unit 1 --port 5020\n"
                  "         m2m-bridge simulate --sunspec --unit 3")
    what = sim.add_mutually_exclusive_group(required=True)
    what.add_argument("-c", "--config", type=Path, help="bridge YAML file")
    what.add_argument("--map", metavar="library:NAME",
                      help="serve this library map over Modbus TCP (see 'm2m-bridge maps')")
    what.add_argument("--sunspec", action="store_true",
                      help="serve a SunSpec inverter over Modbus TCP (the 'SunS' marker at "
                           "40000, models 1, 103 and 160), for 'm2m-bridge sunspec'")
    sim.add_argument("--unit", type=int, default=None,
                     help="with --map or --sunspec: slave id (default 1)")
    sim.add_argument("--host", default=None,
                     help="with --map or --sunspec: address to listen on (default 127.0.0.1)")
    sim.add_argument("--port", type=int, default=None,
                     help="with --map or --sunspec: TCP port (default 5020)")
    sim.add_argument("--baud", type=argtypes.baud, default=None, metavar="N|config",
                     help="pace serial links like a real line at N baud, or at each link's "
                          "own baudrate with 'config' (default: no pacing; a pty is instant)")
    sim.add_argument("--turnaround", type=float, default=0.0, metavar="MS",
                     help="with --baud: the slave's delay before replying, in ms (default 0)")
    _commissioning_args(command)
    maps = command(
        "maps", "the device library shipped with the package: list it, or show one map "
        "(a device uses one with `map: library:NAME`)",
        "m2m-bridge maps\n"
        "         m2m-bridge maps show eastron-sdm630 --json",
    )
    maps.add_argument("action", nargs="?", default="list", choices=["list", "show"],
                      help="list (default) or show NAME")
    maps.add_argument("name", nargs="?", help="with show: the map, e.g. eastron-sdm630")
    maps.add_argument("--json", action="store_true", help="print JSON instead of a table")
    demo = command("demo", "simulated devices -> bridge -> broker, with a live view",
                   "m2m-bridge demo")
    demo.add_argument("-c", "--config", type=Path, default=None,
                      help="config to demo (default: configs/bridge.yaml)")
    demo.add_argument("--duration", type=float, default=None, help="stop after N seconds")
    return parser


def _scan_args(parser: argparse.ArgumentParser, *, timeout_help: str) -> None:
    """The link and the unit ids a scan (scan, discover) asks."""
    parser.add_argument("url", help="link URL (tcp://host[:port], rtu:///dev/ttyUSB0?baudrate=…)")
    parser.add_argument("--units", default="1-247", metavar="LIST",
                        help="unit ids and ranges, e.g. 1-10,20,30-32 (default 1-247)")
    parser.add_argument("--timeout", type=argtypes.duration, default=0.2, metavar="T",
                        help=timeout_help)


def _commissioning_args(command: Callable[[str, str, str], argparse.ArgumentParser]) -> None:
    """scan, identify, probe and sunspec: finding out what is on a link, without a config."""
    scan = command(
        "scan", "list the unit ids that answer on a link (any reply, exceptions included)",
        "m2m-bridge scan 'rtu:///dev/ttyUSB0?baudrate=9600' --units 1-247 --timeout 100ms\n"
        "         m2m-bridge scan tcp://192.168.1.20 --units 1-10,20,30-32 --json",
    )
    _scan_args(scan, timeout_help="wait for each unit, e.g. 100ms or 0.5 (default 200ms)")
    scan.add_argument("--json", action="store_true",
                      help='print only JSON: [{"unit": N, "answer": …, "ms": …}]')

    identify = command(
        "identify", "read a device's identification (FC43/14) and server id (FC17)",
        "m2m-bridge identify tcp://192.168.1.20 --unit 3\n"
        "         m2m-bridge identify 'rtu:///dev/ttyUSB0?baudrate=19200&parity=E' --unit 1 --json",
    )
    identify.add_argument("url", help="link URL (tcp://host[:port], rtu:///dev/ttyUSB0?…)")
    identify.add_argument("--unit", type=int, required=True, help="slave id, 1-247")
    identify.add_argument("--timeout", type=argtypes.duration, default=2.0, metavar="T",
                          help="wait for each answer, e.g. 500ms (default 2s)")
    identify.add_argument("--json", action="store_true", help="print JSON instead of a table")

    probe = command(
        "probe", "rank every type x byte order some registers could be, most plausible first",
        "m2m-bridge probe tcp://192.168.1.20 --unit 3 --table input --address 0 --count 2 "
        "--expect 200..250",
    )
    probe.add_argument("url", help="link URL (tcp://host[:port], rtu:///dev/ttyUSB0?…)")
    probe.add_argument("--unit", type=int, required=True, help="slave id, 1-247")
    probe.add_argument("--table", default="holding", choices=["holding", "input"],
                       help="register table (default holding)")
    probe.add_argument("--address", type=int, required=True, help="0-based PDU address")
    probe.add_argument("--count", type=int, default=2,
                       help="registers to read (default 2; 1, 2 and 4 hold numbers)")
    probe.add_argument("--expect", type=argtypes.expect, default=None, metavar="LOW..HIGH",
                       help="the range the value should lie in, e.g. 200..250 (mains volts)")
    probe.add_argument("--timeout", type=argtypes.duration, default=2.0, metavar="T",
                       help="wait for each answer, e.g. 500ms (default 2s)")
    probe.add_argument("--json", action="store_true",
                       help='print JSON: [{"type", "byte_order", "value", …}], best first')

    sunspec = command(
        "sunspec", "find a device's SunSpec marker (40000, 0 or 50000), walk its model chain "
        "and show every point with its scale factor applied; --write saves the map",
        "m2m-bridge sunspec tcp://192.168.1.30 --unit 1\n"
        "         m2m-bridge sunspec 'rtu:///dev/ttyUSB0?baudrate=9600' --unit 2 "
        "--write inverter.yaml",
    )
    sunspec.add_argument("url", help="link URL (tcp://host[:port], rtu:///dev/ttyUSB0?…)")
    sunspec.add_argument("--unit", type=int, required=True, help="slave id, 1-247")
    sunspec.add_argument("--base", type=int, default=None,
                         help="look for the marker only here (default: 40000, then 0, 50000)")
    sunspec.add_argument("--timeout", type=argtypes.duration, default=2.0, metavar="T",
                         help="wait for each answer, e.g. 500ms (default 2s)")
    sunspec.add_argument("--json", action="store_true",
                         help='print JSON: {"base", "models", "points" (with values), "map"}')
    sunspec.add_argument("-o", "--write", type=Path, default=None, metavar="FILE",
                         help="write the map as YAML, for a device's `map: FILE`")
    sunspec.add_argument("--baked-scale", action="store_true",
                         help="multiply the scale factors read now into each point's `scale` "
                         "(default: keep the *_SF registers as points and read them with "
                         "every poll, `scale_from:`, right also when the device changes them)")

    discover = command(
        "discover", "scan a link and recognise each unit that answers (FC43 identification, "
        "SunSpec, the device library by maker and model or by register signature): a starter "
        "config that validates, with a comment per device on how it was recognised and what "
        "to check by hand",
        "m2m-bridge discover 'rtu:///dev/ttyUSB0?baudrate=9600' --units 1-20 -o bridge.yaml\n"
        "         m2m-bridge discover tcp://192.168.1.20 --units 1-10 --json",
    )
    _scan_args(discover, timeout_help="the scan's wait for each unit, e.g. 100ms (default "
                                      "200ms); the questions to units that answered wait at "
                                      "least 1s")
    discover.add_argument("-o", "--output", type=Path, default=None, metavar="FILE",
                          help="write the config here (SunSpec maps go to maps/ beside it); "
                               "default: print it, with the table on stderr")
    discover.add_argument("--force", action="store_true", help="overwrite an existing -o FILE")
    discover.add_argument("--json", action="store_true",
                          help='print JSON: [{"unit", "identity", "match", "how", "map", …}]; '
                               "the config only with -o")


def _device_args(parser: argparse.ArgumentParser, *, tables: list[str]) -> None:
    """The arguments `read` and `write` share: where the device is and how to decode."""
    parser.add_argument("-c", "--config", type=Path, help="bridge YAML file (config form)")
    parser.add_argument("target", help="device URL (tcp://host[:port]) or, with -c, a device")
    parser.add_argument("--unit", type=int, default=1, help="slave id, 0-247 (default 1)")
    parser.add_argument("--table", default="holding", choices=tables,
                        help="register table (default holding)")
    parser.add_argument("--type", dest="type_", default=None, metavar="TYPE",
                        help=f"value type: {', '.join(POINT_TYPES)} (default uint16; bool on "
                             "coils and discrete inputs)")
    parser.add_argument("--byte-order", default="ABCD", choices=list(BYTE_ORDERS),
                        help="order of the bytes of a 32/64-bit value as they arrive "
                             "(default ABCD, big-endian)")
    parser.add_argument("--timeout", type=argtypes.seconds, default=2.0, metavar="S",
                        help="seconds to wait for each answer (default 2; URL form)")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from bridge.logs import configure  # after parsing: `--help` and usage errors need no logging

    # Daemons log their life at info; one-off commands print their answer and warn only.
    quiet = args.command not in ("run", "simulate")
    configure(level=args.log_level or ("warning" if quiet else "info"), json=args.log_json)
    handler = _COMMANDS[args.command]
    try:
        return handler(args)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_CONFIG
    except UsageError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except BridgeError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return EXIT_OK
    except BrokenPipeError:
        # `m2m-bridge read … | head`: the reader left; say nothing more, as cat would.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    finally:
        if argv is None:  # the process's own command line: it exits next
            # Spare the interpreter's last collections a walk over every object the imports
            # made (~20 ms of a one-off `read`): the OS takes the memory back either way.
            gc.freeze()


def _cmd_validate(args: argparse.Namespace) -> int:
    config = _load(args.config, check_state_dir=True)
    for warning in config.warnings:
        print(warning, file=sys.stderr)
    points = sum(len(d.points) for d in config.devices)
    print(f"{args.config}: ok ({len(config.links)} links, {len(config.devices)} devices, "
          f"{points} points)")
    return EXIT_OK


def _cmd_schema(args: argparse.Namespace) -> int:
    from bridge.config import config_json_schema

    print(json.dumps(config_json_schema(), indent=2))
    return EXIT_OK


def _cmd_plan(args: argparse.Namespace) -> int:
    from bridge.tools.plan import plan_report

    print(plan_report(_load(args.config)))
    return EXIT_OK


def _cmd_read(args: argparse.Namespace) -> int:
    import asyncio

    if args.config is not None:
        from bridge.tools.points import read_config_points

        config = _load(args.config)
        rows = asyncio.run(read_config_points(config, args.target, args.points))
        if args.json:
            print(json.dumps([{"point": r.name, "value": r.value, "unit": r.unit} for r in rows]))
        else:
            _table([("point", "value", "unit")]
                   + [(r.name, _cell(r.value), r.unit or "") for r in rows])
        return EXIT_OK
    if args.points:
        return _fail("point names need -c FILE; with a URL use --address", EXIT_USAGE)
    from bridge.tools.oneshot import read_url  # no config models: the URL form starts fastest

    values = asyncio.run(read_url(
        args.target, unit=args.unit, table=args.table, address=args.address, count=args.count,
        type_=args.type_, byte_order=args.byte_order, timeout=args.timeout,
    ))
    if args.json:
        print(json.dumps([{"address": a, "value": v} for a, v in values]))
    else:
        _table([("address", "value")] + [(str(a), _cell(v)) for a, v in values])
    return EXIT_OK


def _cmd_write(args: argparse.Namespace) -> int:
    import asyncio

    from bridge.tools.points import write_config_point, write_url

    # The value is checked before any connection is made: a refused write opens no socket.
    if args.config is not None:
        if len(args.rest) != 2:
            return _fail("with -c: write -c FILE DEVICE POINT VALUE", EXIT_USAGE)
        config = _load(args.config)
        reading = asyncio.run(write_config_point(config, args.target, *args.rest))
        print(json.dumps(reading.value, ensure_ascii=False))
        return EXIT_OK
    if len(args.rest) != 1:
        return _fail("point names need -c FILE; with a URL give --address and one VALUE",
                     EXIT_USAGE)
    if args.address is None:
        return _fail("--address is required with a URL (writes never default to 0)", EXIT_USAGE)
    value = asyncio.run(write_url(
        args.target, unit=args.unit, table=args.table, address=args.address, type_=args.type_,
        byte_order=args.byte_order, value=args.rest[0], timeout=args.timeout,
    ))
    print(json.dumps(value, ensure_ascii=False))
    return EXIT_OK


def _cell(value: Value) -> str:
    """A value as JSON would write it (strings quoted, so trailing spaces and "" show)."""
    return json.dumps(value, ensure_ascii=False)


def _table(rows: Sequence[Sequence[str]], file: TextIO | None = None) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip(),
              file=file or sys.stdout)


def _cmd_run(args: argparse.Namespace) -> int:
    import asyncio

    from bridge.daemon import run_daemon
    from bridge.service import Service

    # A bad config or an unusable state_dir stops here (exit 78), before any device is touched.
    config = _load(args.config, check_state_dir=True, apart=True)
    asyncio.run(run_daemon(args.config, Service(config)))
    return EXIT_OK


def _cmd_simulate(args: argparse.Namespace) -> int:
    import asyncio

    from bridge.sim.run import DEFAULT_PORT, library_config, run_simulator

    mapped = {"--unit": args.unit, "--host": args.host, "--port": args.port}
    if args.config is not None:
        if given := [flag for flag, value in mapped.items() if value is not None]:
            return _fail(f"{', '.join(given)} only with --map or --sunspec (a config names "
                         "its own)", EXIT_USAGE)
        config = _load(args.config)
    elif args.sunspec:
        from bridge.sim.sunspec import sunspec_config

        config = sunspec_config(unit=1 if args.unit is None else args.unit,
                                host=args.host or "127.0.0.1", port=args.port or DEFAULT_PORT)
    elif not args.map.startswith("library:"):
        return _fail(f"--map {args.map}: expected library:NAME (for a map file, write a config "
                     "and use -c)", EXIT_USAGE)
    else:
        config = library_config(args.map.removeprefix("library:"),
                                unit=1 if args.unit is None else args.unit,
                                host=args.host or "127.0.0.1", port=args.port or DEFAULT_PORT)

    def ready() -> None:
        print("simulating; Ctrl-C stops", file=sys.stderr)

    def announce(text: str) -> None:
        print(text, flush=True)  # stdout: scripts read the pty paths from here

    asyncio.run(run_simulator(config, on_ready=ready, baud=args.baud,
                              turnaround=args.turnaround / 1000, announce=announce))
    return EXIT_OK


def _cmd_scan(args: argparse.Namespace) -> int:
    import asyncio

    from bridge.tools.scan import parse_units, progress_bar, scan

    units = parse_units(args.units)
    bar = progress_bar(len(units))
    try:
        result = asyncio.run(scan(args.url, units=units, timeout=args.timeout,
                                  progress=None if bar is None else lambda *_: bar.update()))
    finally:
        if bar is not None:
            bar.close()
    if args.json:
        print(json.dumps([a.as_json() for a in result.found]))
    elif result.found:
        _table([("unit", "answer", "ms")]
               + [(str(a.unit), a.answer, f"{a.seconds * 1000:.0f}") for a in result.found])
    summary = (f"{len(result.found)} of {result.probed} units answered in "
               f"{result.seconds:.1f}s")
    if not result.found:
        return _fail(f"no unit answered ({result.probed} asked in {result.seconds:.1f}s)")
    if not args.json:
        print(summary, file=sys.stderr)
    return EXIT_OK


def _cmd_identify(args: argparse.Namespace) -> int:
    import asyncio

    from bridge.tools.identify import identify

    found = asyncio.run(identify(args.url, unit=args.unit, timeout=args.timeout))
    if args.json:
        print(json.dumps(found.as_json(), ensure_ascii=False))
    else:
        _table([("object", "value"), *found.rows()])
    return EXIT_OK


def _cmd_probe(args: argparse.Namespace) -> int:
    import asyncio

    from bridge.tools.probe import probe, sizes_note

    ranked = asyncio.run(probe(
        args.url, unit=args.unit, table=args.table, address=args.address, count=args.count,
        expect=args.expect, timeout=args.timeout,
    ))
    if args.json:
        print(json.dumps([c.as_json() for c in ranked], ensure_ascii=False))
        return EXIT_OK
    _table([("rank", "type", "byte_order", "value", "second read", "score", "why")] + [
        (str(i), c.type, c.byte_order, _cell(c.value), _cell(c.second), str(c.score),
         ", ".join(c.reasons))
        for i, c in enumerate(ranked, 1)
    ])
    note = sizes_note(args.count)
    if note:
        print(note, file=sys.stderr)
    return EXIT_OK


def _cmd_sunspec(args: argparse.Namespace) -> int:
    import asyncio

    from bridge.tools.sunspec import (
        MODEL_COLUMNS,
        POINT_COLUMNS,
        chain_json,
        model_rows,
        point_rows,
        source_text,
        sunspec,
        write_map,
    )

    chain = asyncio.run(sunspec(args.url, unit=args.unit, base=args.base, timeout=args.timeout))
    source = source_text(args.url, args.unit, chain)
    if args.write is not None:
        command = f"m2m-bridge sunspec {args.url} --unit {args.unit}"
        if args.baked_scale:
            command += " --baked-scale"
        written = write_map(args.write, chain, source=source, command=command,
                            baked=args.baked_scale)
        print(f"{args.write}: a map of {written} points (a device uses it with "
              f"map: {args.write})", file=sys.stderr)
    if args.json:
        print(json.dumps(chain_json(chain, source=source, baked=args.baked_scale),
                         ensure_ascii=False))
        return EXIT_OK
    maker = " ".join(filter(None, (chain.common("Mn"), chain.common("Md"))))
    print(f"SunSpec device at {chain.base}: {maker or '(no common model)'}")
    print()
    _table([MODEL_COLUMNS, *model_rows(chain)])
    print()
    _table([POINT_COLUMNS, *point_rows(chain)])
    return EXIT_OK


def _cmd_discover(args: argparse.Namespace) -> int:
    import asyncio
    import shlex

    from bridge.tools.discover import discover
    from bridge.tools.scan import parse_units, progress_bar
    from bridge.tools.starter import save, starter_config, write_sunspec_maps

    units = parse_units(args.units)
    if args.output is not None and args.output.exists() and not args.force:
        return _fail(f"-o {args.output}: the file exists (--force overwrites it)", EXIT_USAGE)
    bar = progress_bar(len(units))
    try:
        found = asyncio.run(discover(args.url, units=units, timeout=args.timeout,
                                     progress=None if bar is None else lambda *_: bar.update()))
    finally:
        if bar is not None:
            bar.close()
    if not found.found:
        if args.json:
            print("[]")
        return _fail(f"no unit answered ({found.probed} asked in {found.seconds:.1f}s)")
    if args.output is not None or not args.json:
        write_sunspec_maps(found, Path() if args.output is None else args.output.parent)
        command = f"m2m-bridge discover {shlex.quote(args.url)} --units {args.units}"
        text = starter_config(found, command=command)
        if args.output is None:
            sys.stdout.write(text)
            sys.stdout.flush()  # before the table on stderr, when both go to a terminal
        else:
            save(args.output, text)
    if args.json:
        print(json.dumps([f.as_json() for f in found.found], ensure_ascii=False))
    else:
        _table([("unit", "answer", "identified as", "how", "map"),
                *(f.row() for f in found.found)],
               file=sys.stderr if args.output is None else sys.stdout)
    recognised = sum(1 for f in found.found if f.match is not None)
    summary = (f"{len(found.found)} of {found.probed} units answered, {recognised} recognised, "
               f"in {found.seconds:.1f}s")
    if args.output is not None:
        summary += f"; {args.output} written: check the comment above each device"
    if not args.json or args.output is not None:
        print(summary, file=sys.stderr)
    return EXIT_OK


def _cmd_maps(args: argparse.Namespace) -> int:
    from bridge.tools.maps import POINT_COLUMNS, library, library_map, map_json, point_rows

    if args.action == "list":
        if args.name is not None:
            return _fail(f"maps list takes no name; to see one: maps show {args.name}",
                         EXIT_USAGE)
        entries = library()
        if args.json:
            print(json.dumps([e.as_json() for e in entries], ensure_ascii=False))
        else:
            _table([("name", "manufacturer", "model", "points", "description")] + [
                (e.name, e.manufacturer, e.model, str(e.points), e.description) for e in entries
            ])
        return EXIT_OK
    if args.name is None:
        return _fail("maps show needs a NAME (see 'm2m-bridge maps list')", EXIT_USAGE)
    name = args.name.removeprefix("library:")
    device_map = library_map(name)
    if args.json:
        print(json.dumps(map_json(name, device_map), ensure_ascii=False))
        return EXIT_OK
    print(f"{name}: {device_map.manufacturer} {device_map.model} - {device_map.description}")
    print(f"source: {device_map.source}")
    print(f"use: map: library:{name}")
    print()
    _table([POINT_COLUMNS, *point_rows(device_map)])
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    import asyncio

    from bridge.sim.demo import run_demo

    code: int = asyncio.run(run_demo(args.config, duration=args.duration))
    return code


_COMMANDS = {
    "run": _cmd_run,
    "validate": _cmd_validate,
    "schema": _cmd_schema,
    "plan": _cmd_plan,
    "read": _cmd_read,
    "write": _cmd_write,
    "simulate": _cmd_simulate,
    "demo": _cmd_demo,
    "scan": _cmd_scan,
    "identify": _cmd_identify,
    "probe": _cmd_probe,
    "maps": _cmd_maps,
    "sunspec": _cmd_sunspec,
    "discover": _cmd_discover,
}
