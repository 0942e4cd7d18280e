"""The device library (bridge/maps/): every map loads through `map: library:NAME`, plans, and
is served by the simulator and read back as the bridge reads it; unknown names are located
config errors that suggest the near ones.

Parametrised over the library, so a new map file is tested without touching this file.
"""

from __future__ import annotations

import importlib.machinery
import json
import math
import subprocess
import sys
import types
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
import yaml

from bridge.config import (
    Config,
    Point,
    library_names,
    load_config,
    load_library_map,
)
from bridge.config.library import library_dir
from bridge.core.codec import Value
from bridge.core.planner import plan_device
from bridge.errors import ConfigError, UsageError
from bridge.sim.run import library_config
from bridge.tools.identify import identify
from bridge.tools.maps import library, library_map, map_json, point_rows
from bridge.tools.points import read_config_points
from tests.helpers import (
    ROOT,
    free_port,
    run_cli,
    simulated,
    stop_process,
    wait_for_port,
)

NAMES = library_names()
NOTICE = (library_dir() / "NOTICE").read_text()


def config_file(directory: Path, port: int = 5020) -> Path:
    """A config with every library map as a device (unit 1, 2, …) on one TCP link."""
    path = directory / "bridge.yaml"
    path.write_text(yaml.safe_dump({
        "version": 1,
        "links": [{"name": "bus", "type": "tcp", "host": "127.0.0.1", "port": port}],
        "devices": [{"name": name, "link": "bus", "unit": unit, "map": f"library:{name}"}
                    for unit, name in enumerate(NAMES, 1)],
    }))
    return path


def expected(point: Point) -> Value | None:
    """What reading `point` should give when the simulator serves its `simulate.value`."""
    if point.simulate is None or point.simulate.value is None:
        return None
    value = point.simulate.value
    if point.values is not None and isinstance(value, int) and not isinstance(value, bool):
        return point.values[value]  # enums publish their name
    return value


def test_the_library_has_twenty_maps_of_named_devices() -> None:
    """Twenty or more maps, each naming its maker, model, description and source."""
    entries = library()
    assert len(entries) >= 20
    for entry in entries:
        assert entry.manufacturer, entry.name
        assert entry.model, entry.name
        assert entry.description, entry.name
        assert entry.source, f"{entry.name}: no source for its register facts"
        assert entry.name in NOTICE, f"{entry.name}: not in bridge/maps/NOTICE"


@pytest.mark.parametrize("name", NAMES)
def test_map_loads_through_the_config_and_plans(name: str, tmp_path: Path) -> None:
    """`map: library:NAME` merges the map into the device, with no Modicon warnings for the
    vendor's own high addresses, and the planner covers every point."""
    config = load_config(config_file(tmp_path))
    device = config.device(name)
    device_map = load_library_map(name)
    assert [p.name for p in device.points] == [p.name for p in device_map.points]
    assert (device.manufacturer, device.model) == (device_map.manufacturer, device_map.model)
    assert not [w for w in config.warnings if name in w.file]
    groups = plan_device(device.points, interval=device.interval)
    planned = {p.name for g in groups for r in g.requests for p in r.points}
    assert planned == {p.name for p in device.points}


@pytest.mark.parametrize("name", NAMES)
def test_every_register_point_has_a_simulated_value(name: str) -> None:
    """Plausible simulated readings need a value per point (bits read their word)."""
    missing = [p.name for p in load_library_map(name).points
               if p.bit is None and expected(p) is None]
    assert not missing, f"{name}: no simulate.value for {missing}"


def test_an_unknown_library_map_is_a_located_error_naming_near_ones(tmp_path: Path) -> None:
    path = tmp_path / "bridge.yaml"
    path.write_text(
        "version: 1\n"
        "links: [{name: bus, type: tcp, host: 127.0.0.1}]\n"
        "devices:\n"
        "  - {name: meter, link: bus, map: 'library:sdm630'}\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == (
        f"{path}:4: devices[0].map: unknown library map 'sdm630' (did you mean eastron-sdm630?)"
    )


def test_library_names_cannot_leave_the_library() -> None:
    with pytest.raises(UsageError, match="unknown library map"):
        library_map("../../configs/maps/pump-drive")


def test_show_gives_points_as_rows_and_the_map_as_json() -> None:
    device_map = library_map("library:abb-b23")
    rows = {row[0]: row for row in point_rows(device_map)}
    assert rows["energy_import"] == (
        "energy_import", "holding", "20480", "uint64", "ABCD", "kWh", "0.01", "r")
    data = map_json("abb-b23", device_map)
    assert data["manufacturer"] == "ABB"
    assert data["points"][0]["address"] == 20480


def test_simulate_map_needs_a_known_name_and_a_unit() -> None:
    with pytest.raises(UsageError, match="did you mean eastron-sdm630"):
        library_config("sdm630", unit=1)
    with pytest.raises(UsageError, match="1-247"):
        library_config("eastron-sdm630", unit=0)


# --- served and read back: one simulator for the whole library, a unit per map ------------


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Config]:
    config = load_config(config_file(tmp_path_factory.mktemp("library"), free_port()))
    async with simulated(config):
        yield config


@pytest.mark.integration
@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("name", NAMES)
async def test_map_is_simulated_and_read_back(name: str, served: Config) -> None:
    """Every point reads back its simulated value through the one-shot read path (the
    planner's coalesced requests, the codec, scale and precision)."""
    points = {p.name: p for p in served.device(name).points}
    readings = {r.name: r.value for r in await read_config_points(served, name, [])}
    assert set(readings) == set(points)
    for point_name, value in readings.items():
        point = points[point_name]
        want = expected(point)
        if want is None:
            continue  # a bit of a status word: checked through the word
        if isinstance(want, (str, bool)) or point.values:
            assert value == want, point_name
            continue
        assert isinstance(value, (int, float)), point_name
        # An integer register holds whole raw steps; `precision` rounds; float32 has ~7 digits.
        step = abs(point.scale) if "int" in point.type else 0.0
        rounding = 10.0 ** -point.precision if point.precision is not None else 0.0
        assert math.isclose(value, float(want), rel_tol=1e-6, abs_tol=max(step, rounding)), (
            f"{name}.{point_name}: read {value}, simulated {want}")


@pytest.mark.integration
async def test_simulate_map_serves_the_library_map_with_its_identity() -> None:
    """The config `simulate --map library:NAME --unit N` serves: the map's points, and
    FC43 answers with its manufacturer and model."""
    port = free_port()
    config = library_config("eastron-sdm120", unit=7, port=port)
    async with simulated(config):
        read = {r.name: r.value for r in await read_config_points(config, "eastron-sdm120",
                                                                   ["voltage"])}
        found = await identify(f"tcp://127.0.0.1:{port}", unit=7, timeout=2.0)
    assert read == {"voltage": 230.4}
    assert {"Eastron", "SDM120-Modbus"} <= set(found.objects.values())


# --- the CLI: maps list/show and simulate --map -------------------------------------------


@pytest.mark.integration
def test_cli_maps_lists_the_library_as_a_table_and_as_json() -> None:
    table = run_cli("maps")
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split() == ["name", "manufacturer", "model", "points", "description"]
    assert [row.split()[0] for row in rows] == NAMES
    listed = run_cli("maps", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    entries = json.loads(listed.stdout)
    assert [e["name"] for e in entries] == NAMES
    assert {"name", "manufacturer", "model", "source"} <= set(entries[0])


@pytest.mark.integration
def test_cli_maps_show_prints_the_points_and_the_map_json() -> None:
    shown = run_cli("maps", "show", "eastron-sdm630")
    assert shown.returncode == 0, shown.stderr
    assert "source: Eastron SDM630-Modbus V2 user manual" in shown.stdout
    assert "use: map: library:eastron-sdm630" in shown.stdout
    row = next(line for line in shown.stdout.splitlines() if line.startswith("frequency "))
    assert row.split() == ["frequency", "input", "70", "float32", "ABCD", "Hz", "r"]
    data = json.loads(run_cli("maps", "show", "eastron-sdm630", "--json").stdout)
    assert data["name"] == "eastron-sdm630"
    assert data["points"][0] == {
        **data["points"][0], "name": "voltage_l1", "table": "input", "address": 0,
        "type": "float32", "unit": "V"}


@pytest.mark.integration
@pytest.mark.parametrize(("args", "needle"), [
    (["maps", "show", "sdm630"], "unknown library map 'sdm630' (did you mean eastron-sdm630?)"),
    (["maps", "show"], "maps show needs a NAME"),
    (["simulate"], "one of the arguments -c/--config --map --sunspec is required"),
    (["simulate", "--map", "eastron-sdm630"], "expected library:NAME"),
    (["simulate", "--map", "library:sdm630"], "did you mean eastron-sdm630?"),
    (["simulate", "--map", "library:eastron-sdm630", "--unit", "0"], "1-247"),
    (["simulate", "-c", "bridge.yaml", "--map", "library:eastron-sdm630"], "not allowed with"),
    (["simulate", "-c", "bridge.yaml", "--unit", "3"], "--unit only with --map"),
])
def test_cli_library_usage_errors_exit_2_in_one_line(args: list[str], needle: str) -> None:
    r = run_cli(*args)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.integration
@pytest.mark.parametrize("command", ["maps", "simulate"])
def test_cli_help_shows_an_example(command: str) -> None:
    r = run_cli(command, "--help")
    assert r.returncode == 0, r.stderr
    assert "example: m2m-bridge" in r.stdout
    assert "library:" in r.stdout


@pytest.mark.integration
def test_cli_simulate_map_serves_a_unit_until_sigterm() -> None:
    """`simulate --map library:NAME --unit N --port P` answers as unit N; SIGTERM stops it
    with exit 0."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "bridge", "simulate", "--map", "library:eastron-sdm120",
         "--unit", "5", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
    )
    try:
        wait_for_port(port, process=process)
        r = run_cli("read", f"tcp://127.0.0.1:{port}", "--unit", "5", "--table", "input",
                    "--address", "0", "--type", "float32", "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == [{"address": 0, "value": 230.4}]
    finally:
        _, err = stop_process(process)
    assert process.returncode == 0, err
    assert b"Traceback" not in err


def test_the_sunspec_maps_are_what_their_generator_makes() -> None:
    """bridge/maps/sunspec-*.yaml are scripts/gen-sunspec-maps' output, committed: each is
    reproducible from the model definitions, and reads its scale factors live."""
    script = ROOT / "scripts" / "gen-sunspec-maps"
    loader = importlib.machinery.SourceFileLoader("gen_sunspec_maps", str(script))
    generator = types.ModuleType(loader.name)
    generator.__file__ = str(script)
    loader.exec_module(generator)
    assert len(generator.MAPS) >= 3
    for name, (label, models) in generator.MAPS.items():
        committed = (library_dir() / f"{name}.yaml").read_text(encoding="utf-8")
        assert generator.library_map(name, label, models) == committed, (
            f"{name}: run scripts/gen-sunspec-maps")
        points = {p.name: p for p in load_library_map(name).points}
        scaled = {p.name: p.scale_from for p in points.values() if p.scale_from}
        assert "m103_W" in scaled or "m101_W" in scaled
        assert all(points[factor].type == "int16" for factor in scaled.values())
