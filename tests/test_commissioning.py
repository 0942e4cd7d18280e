"""Commissioning commands against the simulator: scan, identify and probe, over TCP and RTU.

The RTU line is the serial simulator's pty (bridge.sim.serial) with units 1, 2 and 5; unit 3
and 4 are dead: they never answer, as an empty id on an RS-485 line does not.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from bridge.config import load_config
from tests.helpers import assert_usage_error, cli, free_port, rtu_line, simulated

VOLTS = 230.5


def write_config(tmp_path: Path, port: int) -> Path:
    def device(name: str, link: str, unit: int, **extra: Any) -> dict[str, Any]:
        points = [{"name": "voltage", "table": "input", "address": 0, "type": "float32",
                   "byte_order": "CDAB", "simulate": {"value": VOLTS}},
                  {"name": "count", "address": 10, "type": "uint16",
                   "simulate": {"value": 7}}]
        return {"name": name, "link": link, "unit": unit, "points": points, **extra}

    path = tmp_path / "bridge.yaml"
    path.write_text(yaml.safe_dump({
        "version": 1,
        "gateway": {"id": "commissioning"},
        "links": [
            {"name": "plc", "type": "tcp", "host": "127.0.0.1", "port": port},
            {"name": "bus", "type": "rtu", "port": "/dev/null", "baudrate": 19200},
        ],
        "devices": [
            device("meter", "plc", 3, manufacturer="Eastron", model="SDM630"),
            device("pump", "plc", 4),
            device("rtu-1", "bus", 1, manufacturer="ACME", model="X1"),
            device("rtu-2", "bus", 2),
            device("rtu-5", "bus", 5),
        ],
    }))
    return path


@pytest.fixture
async def tcp(tmp_path: Path) -> AsyncIterator[str]:
    port = free_port()
    async with simulated(write_config(tmp_path, port)):
        yield f"tcp://127.0.0.1:{port}"


@pytest.fixture
def rtu(tmp_path: Path) -> Iterator[str]:
    """The RTU units on a pty paced at 19200 baud."""
    with rtu_line(load_config(write_config(tmp_path, free_port())), tmp_path / "ptys") as url:
        yield url


@pytest.mark.integration
async def test_scan_tcp_json(tcp: str) -> None:
    """Served units answer with registers; the simulator answers every other unit as a
    gateway does (exception 0B), which a scan counts as absent."""
    r = await cli("scan", tcp, "--units", "1-6", "--timeout", "300ms", "--json")
    assert r.returncode == 0, r.stderr
    found = {f["unit"]: f["answer"] for f in json.loads(r.stdout)}
    assert sorted(found) == [3, 4]
    assert found[3] == found[4] == "registers"
    assert r.stderr == ""  # nothing but JSON, and no progress bar off a terminal


@pytest.mark.integration
async def test_scan_rtu_skips_the_dead(rtu: str) -> None:
    """On the paced RTU line units 3, 4 and 6 are silent; an exception counts as present."""
    r = await cli("scan", rtu, "--units", "1-6", "--timeout", "100ms", "--json")
    assert r.returncode == 0, r.stderr
    assert [f["unit"] for f in json.loads(r.stdout)] == [1, 2, 5]
    r = await cli("scan", rtu, "--units", "5,3,1", "--timeout", "100ms")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["unit", "answer", "ms"]
    assert [line.split()[0] for line in lines[1:]] == ["5", "1"]
    assert "2 of 3 units answered" in r.stderr


@pytest.mark.integration
async def test_scan_of_an_empty_range_is_exit_1(rtu: str) -> None:
    r = await cli("scan", rtu, "--units", "3-4", "--timeout", "100ms", "--json")
    assert r.returncode == 1
    assert json.loads(r.stdout) == []
    assert r.stderr.count("\n") == 1
    assert "no unit answered" in r.stderr


@pytest.mark.integration
async def test_identify_tcp(tcp: str) -> None:
    r = await cli("identify", tcp, "--unit", "3", "--json")
    assert r.returncode == 0, r.stderr
    found = json.loads(r.stdout)
    assert found["objects"]["VendorName"] == "Eastron"
    assert found["objects"]["ProductCode"] == "SDM630"
    assert found["objects"]["0x80"] == "simulated by m2m-bridge"  # the extended category
    assert found["server_id"]["running"] is True
    assert found["server_id"]["text"] == "Eastron SDM630"  # the last byte kept
    assert found["refused"] == {}
    r = await cli("identify", tcp, "--unit", "4")  # no manufacturer: the simulator's
    assert r.returncode == 0, r.stderr
    assert "VendorName" in r.stdout
    assert "m2m-bridge" in r.stdout


@pytest.mark.integration
async def test_identify_rtu_follows_more_follows(rtu: str) -> None:
    """The serial simulator sends three objects a frame: all seven need three requests."""
    r = await cli("identify", rtu, "--unit", "1", "--json")
    assert r.returncode == 0, r.stderr
    found = json.loads(r.stdout)
    assert found["objects"]["VendorName"] == "ACME"
    assert found["objects"]["ModelName"] == "X1"
    assert found["objects"]["UserApplicationName"] == "rtu-1"
    assert len(found["objects"]) == 7
    assert found["server_id"]["data"].startswith("01 ff")


async def assert_dead(url: str) -> None:
    r = await cli("identify", url, "--unit", "6", "--timeout", "200ms")
    assert r.returncode == 1
    assert r.stdout == ""
    assert r.stderr.count("\n") == 1
    assert "Traceback" not in r.stderr


@pytest.mark.integration
async def test_identify_dead_rtu_unit_is_exit_1(rtu: str) -> None:
    await assert_dead(rtu)


@pytest.mark.integration
async def test_identify_missing_unit_behind_the_gateway_is_exit_1(tcp: str) -> None:
    """The simulator's FC43/FC17 say 0B (gateway target failed to respond) for a unit it
    does not serve: nothing answered, so exit 1."""
    await assert_dead(tcp)


@pytest.mark.integration
async def test_probe_ranks_the_swapped_float_first(tcp: str) -> None:
    r = await cli("probe", tcp, "--unit", "3", "--table", "input", "--address", "0",
                  "--expect", "200..250", "--json")
    assert r.returncode == 0, r.stderr
    ranked = json.loads(r.stdout)
    assert ranked[0] == {"type": "float32", "byte_order": "CDAB", "value": VOLTS,
                         "second_read": VOLTS, "score": ranked[0]["score"],
                         "reasons": ["in expected range", "short decimal"]}
    assert len(ranked) >= 12  # 3 types x 4 orders, and perhaps text
    r = await cli("probe", tcp, "--unit", "3", "--address", "10", "--count", "1")
    assert r.returncode == 0, r.stderr
    first = r.stdout.splitlines()[1].split()
    assert first[:4] == ["1", "uint16", "ABCD", "7"]


@pytest.mark.integration
async def test_probe_over_rtu(rtu: str) -> None:
    r = await cli("probe", rtu, "--unit", "5", "--table", "input", "--address", "0", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)[0]["byte_order"] == "CDAB"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["scan", "tcp://127.0.0.1", "--units", "1-300"], "must lie within 1-247"),
        (["scan", "tcp://127.0.0.1", "--units", "5-2"], "'5-2' must lie within"),
        (["scan", "tcp://127.0.0.1", "--units", "a"], "'a' is not a unit id"),
        (["scan", "tcp://127.0.0.1", "--timeout", "soon"], "argument --timeout"),
        (["scan", "ftp://x"], "scheme must be one of"),
        (["identify", "tcp://127.0.0.1"], "--unit"),
        (["identify", "tcp://127.0.0.1", "--unit", "0"], "--unit 0"),
        (["probe", "tcp://127.0.0.1", "--unit", "1"], "--address"),
        (["probe", "tcp://127.0.0.1", "--unit", "1", "--address", "0", "--table", "coil"],
         "argument --table"),
        (["probe", "tcp://127.0.0.1", "--unit", "1", "--address", "0", "--expect", "9..1"],
         "argument --expect"),
        (["probe", "tcp://127.0.0.1", "--unit", "1", "--address", "0", "--count", "126"],
         "--count 126"),
    ],
)
@pytest.mark.integration
async def test_bad_arguments_exit_2(args: list[str], needle: str) -> None:
    assert_usage_error(await cli(*args), needle)
