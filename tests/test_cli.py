"""The CLI as an operator uses it: exit codes, one-line errors, tables and JSON."""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import math
import random
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from bridge.cli import build_parser
from bridge.core.codec import shortest_float32
from bridge.errors import TransportError
from bridge.transports.modbus import Endpoint, ModbusClient
from tests.helpers import cli, free_port, simulated

POINTS = [
    {"name": "voltage", "table": "input", "address": 0, "type": "float32", "unit": "V"},
    {"name": "current", "table": "input", "address": 2, "type": "float32", "byte_order": "CDAB",
     "unit": "A"},
    {"name": "temp", "address": 10, "type": "int16", "scale": 0.1, "unit": "°C"},
    {"name": "state", "address": 11, "values": {0: "stopped", 1: "running"}},
    {"name": "pump_on", "table": "coil", "address": 4},
]
# On the `device` fixture only (validate and plan count the POINTS above): a nameplate string
# and a float32 whose float64 widening prints 229.87391662597656.
NAMEPLATE = [
    {"name": "model", "address": 20, "type": "string", "count": 5},
    {"name": "power", "table": "input", "address": 4, "type": "float32", "unit": "W"},
    {"name": "limit", "address": 30, "type": "float32", "writable": True, "unit": "W"},
]
POWER = struct.unpack(">f", struct.pack(">f", 229.87392))[0]


def config_file(tmp_path: Path, port: int, extra: list[dict[str, Any]] | None = None) -> Path:
    path = tmp_path / "bridge.yaml"
    path.write_text(yaml.safe_dump({
        "version": 1,
        "gateway": {"id": "cli"},
        "links": [{"name": "plc", "type": "tcp", "host": "127.0.0.1", "port": port,
                   "timeout": "300ms"}],
        "devices": [{"name": "meter", "link": "plc", "unit": 3,
                     "points": POINTS + (extra or [])}],
    }, allow_unicode=True))
    return path


@pytest.fixture
async def device(tmp_path: Path) -> AsyncIterator[tuple[Path, int]]:
    port = free_port()
    path = config_file(tmp_path, port, NAMEPLATE)
    values: dict[str, Any] = {"voltage": 230.5, "current": 4.25, "temp": 21.5,
                              "state": "running", "pump_on": True,
                              "model": "PX-200  ", "power": POWER, "limit": 50.0}
    async with simulated(path, {"meter": values}):
        yield path, port


class TestRead:
    """`read` from a URL or a configured device."""

    @pytest.mark.integration
    async def test_url_read_json(self, device: tuple[Path, int]) -> None:
        """--json prints [{"address", "value"}] decoded with --type and --byte-order."""
        _, port = device
        r = await cli("read", f"tcp://127.0.0.1:{port}", "--unit", "3", "--table", "input",
                      "--address", "0", "--type", "float32", "--count", "1", "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == [{"address": 0, "value": 230.5}]
        r = await cli("read", f"tcp://127.0.0.1:{port}", "--unit", "3", "--table", "input",
                      "--address", "2", "--type", "float32", "--byte-order", "CDAB", "--json")
        assert json.loads(r.stdout) == [{"address": 2, "value": 4.25}]

    @pytest.mark.integration
    async def test_url_read_table(self, device: tuple[Path, int]) -> None:
        """Without --json the output is a readable table of address and value."""
        _, port = device
        r = await cli("read", f"tcp://127.0.0.1:{port}", "--unit", "3", "--address", "10",
                      "--count", "2", "--type", "int16")
        assert r.returncode == 0, r.stderr
        assert r.stdout.split("\n")[0].split() == ["address", "value"]
        assert r.stdout.split("\n")[1].split() == ["10", "215"]
        assert r.stdout.split("\n")[2].split() == ["11", "1"]

    @pytest.mark.integration
    async def test_config_read_scales_and_names(self, device: tuple[Path, int]) -> None:
        """`read -c FILE DEVICE` reads points as the daemon publishes them."""
        path, _ = device
        r = await cli("read", "-c", str(path), "meter", "--json")
        assert r.returncode == 0, r.stderr
        assert {row["point"]: row["value"] for row in json.loads(r.stdout)} == {
            "voltage": 230.5, "current": 4.25, "temp": 21.5, "state": "running",
            "pump_on": True, "model": "PX-200", "power": 229.87392, "limit": 50.0,
        }
        r = await cli("read", "-c", str(path), "meter", "temp")
        assert r.stdout.split("\n")[1].split() == ["temp", "21.5", "°C"]

    @pytest.mark.integration
    async def test_unknown_point_is_a_usage_error(self, device: tuple[Path, int]) -> None:
        """A point the device does not have: exit 2 and a line naming it."""
        path, _ = device
        r = await cli("read", "-c", str(path), "meter", "nope")
        assert r.returncode == 2
        assert r.stderr.strip() == "m2m-bridge: device 'meter' has no point 'nope'"

    @pytest.mark.integration
    async def test_modbus_exception_is_one_line(self, device: tuple[Path, int]) -> None:
        """A unit the gateway does not serve: exit 1 and one line naming the exception."""
        _, port = device
        r = await cli("read", f"tcp://127.0.0.1:{port}", "--unit", "9", "--address", "0",
                      "--timeout", "0.5")
        assert r.returncode == 1
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1, lines
        assert "unit 9" in lines[0]
        assert "Modbus exception 11 (gateway target device failed to respond)" in lines[0]

    @pytest.mark.integration
    async def test_url_read_string(self, device: tuple[Path, int]) -> None:
        """--type string --count N reads N registers as one string, NULs and trailing
        spaces trimmed, as a map point would."""
        _, port = device
        url = f"tcp://127.0.0.1:{port}"
        r = await cli("read", url, "--unit", "3", "--address", "20", "--type", "string",
                      "--count", "5", "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == [{"address": 20, "value": "PX-200"}]
        r = await cli("read", url, "--unit", "3", "--address", "20", "--type", "string",
                      "--count", "5")
        assert r.returncode == 0, r.stderr
        assert r.stdout.split("\n")[1].split() == ["20", '"PX-200"']

    @pytest.mark.integration
    async def test_float32_prints_its_shortest_form(self, device: tuple[Path, int]) -> None:
        """A float32 prints as the shortest decimal that is the same float32 (229.87392, not
        229.87391662597656): URL form and config form, table and JSON."""
        path, port = device
        url = f"tcp://127.0.0.1:{port}"
        common = ("--unit", "3", "--table", "input", "--address", "4", "--type", "float32")
        r = await cli("read", url, *common, "--json")
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == '[{"address": 4, "value": 229.87392}]'
        r = await cli("read", url, *common)
        assert r.stdout.split("\n")[1].split() == ["4", "229.87392"]
        r = await cli("read", "-c", str(path), "meter", "power", "--json")
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == '[{"point": "power", "value": 229.87392, "unit": "W"}]'
        r = await cli("read", "-c", str(path), "meter", "power")
        assert r.stdout.split("\n")[1].split() == ["power", "229.87392", "W"]

    @pytest.mark.integration
    async def test_float32_write_prints_its_shortest_read_back(
        self, device: tuple[Path, int]
    ) -> None:
        """`write` prints the read-back as `read` does: 229.87392, not its float64 widening."""
        path, port = device
        r = await cli("write", f"tcp://127.0.0.1:{port}", "--unit", "3", "--address", "30",
                      "--type", "float32", "229.87392")
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == "229.87392"
        r = await cli("write", "-c", str(path), "meter", "limit", "229.87392")
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == "229.87392"

    @pytest.mark.integration
    async def test_global_options_after_the_command(self, device: tuple[Path, int]) -> None:
        """--log-level and --log-json are accepted after the command too."""
        _, port = device
        r = await cli("read", f"tcp://127.0.0.1:{port}", "--unit", "3", "--address", "10",
                      "--log-level", "debug", "--log-json")
        assert r.returncode == 0, r.stderr


def test_shortest_float32_round_trips_every_float32() -> None:
    """The shortest form is never longer than needed and always the same 4 bytes."""
    rng = random.Random(8)
    for _ in range(20000):
        wire = rng.getrandbits(32).to_bytes(4, "big")
        value = struct.unpack(">f", wire)[0]
        if math.isnan(value):  # returned as it is
            continue
        short = shortest_float32(value)
        assert struct.pack(">f", short) == wire
        digits = len(repr(short).replace("-", "").replace(".", "").split("e")[0].strip("0"))
        assert digits <= 9
    assert repr(shortest_float32(POWER)) == "229.87392"
    assert repr(shortest_float32(3.4028234663852886e38)) == "3.4028235e+38"  # rounds up, fits


@pytest.mark.parametrize(
    "argv",
    [
        ["--log-level", "debug", "read", "tcp://h", "--log-json"],
        ["read", "tcp://h", "--log-level", "debug", "--log-json"],
        ["--log-json", "--log-level", "debug", "read", "tcp://h"],
    ],
)
def test_global_options_before_or_after_the_command(argv: list[str]) -> None:
    """Either place sets them; the command's copy does not reset a value given before it."""
    args = build_parser().parse_args(argv)
    assert (args.log_level, args.log_json) == ("debug", True)
    args = build_parser().parse_args(["read", "tcp://h"])
    assert (args.log_level, args.log_json) == (None, None)


def test_every_option_has_help() -> None:
    """Every argument of every command says what it is for (new options cannot slip in bare)."""
    def walk(parser: argparse.ArgumentParser, where: str) -> list[str]:
        bare = []
        for action in parser._actions:
            if not action.help or action.help == argparse.SUPPRESS:
                bare.append(f"{where} {'/'.join(action.option_strings) or action.dest}")
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    bare += walk(sub, f"{where} {name}")
        return bare

    assert walk(build_parser(), "m2m-bridge") == []


@pytest.mark.integration
async def test_unreachable_device_is_exit_1_one_line() -> None:
    """Nothing listening: exit 1, one line saying the connection was refused, no traceback."""
    port = free_port()
    r = await cli("read", f"tcp://127.0.0.1:{port}", "--address", "0", "--timeout", "0.5")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert lines == [f"m2m-bridge: tcp://127.0.0.1:{port}: connection failed: refused "
                     "(nothing listening on that port?)"]


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (None, "timed out after 0.2s"),
        (OSError(errno.EHOSTUNREACH, "No route to host"), "no route to host"),
        (OSError(errno.ENETUNREACH, "Network is unreachable"), "network unreachable"),
        (OSError(errno.EACCES, "Permission denied"), "Permission denied"),
        (OSError("Multiple exceptions: [Errno 113] Connect call failed ('::1', 502), "
                 "[Errno 113] Connect call failed ('127.0.0.1', 502)"), "no route to host"),
    ],
)
async def test_connection_failed_says_why(
    monkeypatch: pytest.MonkeyPatch, error: OSError | None, reason: str
) -> None:
    """A failed connect names its cause (pymodbus only logs it): the socket layer is replaced
    here because a real silent host or missing route cannot be had on every machine."""
    async def connect(*_args: Any, **_kwargs: Any) -> Any:
        if error is None:
            await asyncio.sleep(10)  # a host that never answers the SYN
        raise error  # type: ignore[misc]

    monkeypatch.setattr(asyncio.get_running_loop(), "create_connection", connect)
    client = ModbusClient(Endpoint("tcp", "192.0.2.1", 502, 0.2), backoff_cap=0)
    try:
        with pytest.raises(TransportError) as caught:
            await client.read(1, "holding", 0, 1)
    finally:
        client.close()
    assert str(caught.value) == f"tcp://192.0.2.1:502: connection failed: {reason}"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["read", "ftp://x"], "scheme must be one of"),
        (["read", "tcp://127.0.0.1:99999"], "port"),
        (["read", "tcp://127.0.0.1", "--address", "0", "--type", "int33"], "--type 'int33'"),
        (["read", "tcp://127.0.0.1", "--address", "0", "--unit", "300"], "--unit 300"),
        (["read", "tcp://127.0.0.1", "--address", "0", "--count", "200", "--type", "float32"],
         "--count 200 (200 x float32 = 400 registers): one read of holding registers is "
         "limited to 125 registers"),
        (["read", "tcp://127.0.0.1", "--address", "0", "--count", "126"],
         "--count 126: one read of holding registers is limited to 125 registers"),
        (["read", "tcp://127.0.0.1", "--address", "0", "--table", "input", "--count", "126",
          "--type", "string"], "one read of input registers is limited to 125 registers"),
        (["read", "tcp://127.0.0.1", "--address", "0", "--table", "coil", "--count", "2001"],
         "--count 2001: one read of coils is limited to 2000 bits"),
        (["read", "tcp://127.0.0.1", "--address", "0", "--table", "discrete", "--count", "2001"],
         "one read of discrete inputs is limited to 2000 bits"),
        (["read", "tcp://127.0.0.1", "--address", "0", "--table", "coil", "--type", "float32"],
         "hold bits"),
        (["read", "tcp://127.0.0.1", "--bogus"], "unrecognized arguments: --bogus"),
        (["read", "tcp://127.0.0.1", "--unit", "3"], "--address is required with a URL"),
        (["read", "tcp://127.0.0.1", "--address", "0", "--timeout", "0"], "argument --timeout"),
        (["read", "tcp://127.0.0.1", "--address", "0", "--timeout", "-1"], "argument --timeout"),
        (["write", "tcp://127.0.0.1", "--address", "0", "--timeout", "0", "1"],
         "argument --timeout"),
        (["frobnicate"], "invalid choice"),
    ],
)
@pytest.mark.integration
async def test_bad_arguments_exit_2(args: list[str], needle: str) -> None:
    """Bad arguments: exit 2 and a message naming the argument."""
    r = await cli(*args)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["--count", "125"],
        ["--count", "62", "--type", "float32"],
        ["--count", "125", "--type", "string"],
        ["--table", "coil", "--count", "2000"],
        ["--timeout", "0.01"],
    ],
)
@pytest.mark.integration
async def test_reads_at_the_limits_are_allowed(args: list[str]) -> None:
    """The largest legal request passes the checks: it fails only at the (closed) port."""
    r = await cli("read", f"tcp://127.0.0.1:{free_port()}", "--address", "0", *args)
    assert r.returncode == 1, r.stderr
    assert "connection failed" in r.stderr


@pytest.mark.integration
async def test_validate_ok_and_errors(tmp_path: Path) -> None:
    """validate: 0 with a summary, or 78 listing every error with file:line: path."""
    good = config_file(tmp_path, 502)
    r = await cli("validate", "-c", str(good))
    assert r.returncode == 0, r.stderr
    assert "ok (1 links, 1 devices, 5 points)" in r.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text().replace("type: float32", "type: float33", 1)
                   .replace("unit: 3", "unit: 300"))
    r = await cli("validate", "-c", str(bad))
    assert r.returncode == 78
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 2, lines
    assert all(line.startswith(f"{bad}:") for line in lines)
    assert any("float33" in line for line in lines)
    assert any("devices[0].unit" in line for line in lines)


@pytest.mark.integration
async def test_schema_is_json_schema() -> None:
    """schema prints a JSON Schema naming the top-level sections."""
    r = await cli("schema")
    assert r.returncode == 0
    schema = json.loads(r.stdout)
    assert {"version", "mqtt", "links", "devices"} <= set(schema["properties"])


@pytest.mark.integration
async def test_plan_shows_coalesced_requests(tmp_path: Path) -> None:
    """plan lists each request with its registers and counts requests against points."""
    r = await cli("plan", "-c", str(config_file(tmp_path, 502)))
    assert r.returncode == 0, r.stderr
    assert "meter (unit 3 on plc): 3 requests per cycle for 5 points" in r.stdout
    assert "input 0-3 (4, 2 points)" in r.stdout
    assert "total: 3 requests per cycle instead of 5 (one per point)" in r.stdout


@pytest.mark.integration
async def test_every_command_has_help_with_an_example() -> None:
    """--help of each command shows an example."""
    for command in ("run", "validate", "schema", "plan", "read", "write", "simulate", "demo"):
        r = await cli(command, "--help")
        assert r.returncode == 0
        assert "example: m2m-bridge" in r.stdout, command


@pytest.mark.integration
async def test_plan_shows_bus_time_per_serial_link(tmp_path: Path) -> None:
    """plan prices each request on a serial link and sums the load per link."""
    path = tmp_path / "serial.yaml"
    path.write_text(yaml.safe_dump({
        "version": 1,
        "links": [{"name": "rs485-1", "type": "rtu", "port": "/dev/ttyUSB0", "baudrate": 9600}],
        "devices": [
            {"name": f"m{unit}", "link": "rs485-1", "unit": unit, "interval": "1s",
             "points": [{"name": "v", "table": "input", "address": 0, "count": 1,
                         "type": "string"}]}
            for unit in (1, 2)
        ],
    }))
    r = await cli("plan", "-c", str(path))
    assert r.returncode == 0, r.stderr
    # One 1-register read: 8 + 7 bytes at 11 bits, plus 2 x 3.5 characters of silence.
    per_request_ms = (15 * 11 + 2 * 3.5 * 11) / 9600 * 1000
    assert f"~{per_request_ms:.1f} ms" in r.stdout
    assert f"link rs485-1: the polls need {2 * per_request_ms / 10:.1f}% of its bus time" in (
        r.stdout
    )
