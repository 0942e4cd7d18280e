"""`map: sunspec`: a device mapped from its SunSpec model chain when the daemon starts.

The config marks the device (its own points only); the daemon walks the chain, merges the map
under the device's own points, caches it in the state dir and polls it. Unit tests cover the
loader, the merge, the cache and the service's start from a cache; the integration tests run
the daemon as a process against the simulated inverter (bridge.sim.sunspec) and a mosquitto.
"""

from __future__ import annotations

import contextlib
import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from bridge.config import Config, DeviceMap, load_config
from bridge.errors import ConfigError
from bridge.service import Service
from bridge.sim.sunspec import MANUFACTURER, MODEL, sunspec_config
from bridge.sunspec_maps import (
    SunSpecMaps,
    cache_path,
    chain_map,
    read_cache,
    walked_from,
    write_cache,
)
from tests.helpers import Broker, Daemons, Recorder, free_port, recording, simulated, until
from tests.test_sunspec import simulated_words, walk

# What the simulated inverter's mapped points read (bridge.sim.sunspec), scale factors applied.
VOLTS = 230.5  # m103_PhVphA: 2305 with V_SF -1
HERTZ = 50.01  # m103_Hz: 5001 with Hz_SF -2


def _doc(port: int, *, mqtt: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "version": 1,
        "gateway": {"id": "gw"},
        "mqtt": {"host": "127.0.0.1", "port": 1, "topic_prefix": "t", **(mqtt or {})},
        "links": [{"name": "inv", "type": "tcp", "host": "127.0.0.1", "port": port,
                   "timeout": "500ms"}],
        "devices": [{
            "name": "inverter", "link": "inv", "unit": 1, "map": "sunspec",
            "interval": "200ms", "offline_after": 1,
            # Merged by name as with any map: one replaced (no scale: the raw 2305), one added
            # (the common model's ID register, 1).
            "points": [
                {"name": "m103_PhVphA", "address": 40080, "type": "uint16", "unit": "dV"},
                {"name": "common_id", "address": 40002},
            ],
        }],
    }


def _write(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _mapped() -> DeviceMap:
    """The map a walk of the simulated inverter (unit 1) behind link `inv` on port 1 gives."""
    return chain_map(walk(simulated_words(1)), "SunSpec model chain of unit 1 on tcp://127.0.0.1:1")


# --- the config -----------------------------------------------------------------------------


def test_a_sunspec_device_loads_with_its_own_points_only(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path / "bridge.yaml", _doc(1)))
    device = config.device("inverter")
    assert device.map == "sunspec"
    assert [p.name for p in device.points] == ["m103_PhVphA", "common_id"]
    assert config.warnings == []  # 40080 is SunSpec's own address, not Modicon numbering


def test_map_sunspec_on_a_serial_line_link_is_a_located_error(tmp_path: Path) -> None:
    path = tmp_path / "bridge.yaml"
    path.write_text(
        "version: 1\n"
        "links: [{name: scale, type: serial, port: /dev/ttyUSB1}]\n"
        "devices:\n"
        "  - {name: inverter, link: scale, map: sunspec, response: '(?P<w>.*)',\n"
        "     points: [{name: w}]}\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).startswith(f"{path}:4: devices[0].map: map: sunspec reads a "
                                        "SunSpec model chain over Modbus; link 'scale'")


# --- the map, merged and cached -------------------------------------------------------------


def test_the_walked_map_runs_under_the_devices_own_points(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path / "bridge.yaml", _doc(1)))
    maps = SunSpecMaps()
    maps.update(config)
    assert maps.effective(config).devices == []  # not mapped: nothing known to poll
    maps.maps["inverter"] = _mapped()
    device = maps.effective(config).device("inverter")
    points = {p.name: p for p in device.points}
    assert points["m103_Hz"].scale_from == "m103_Hz_SF"  # the factor read with it, live
    assert points["m103_PhVphA"].scale == 1  # the device's own, in the map's place
    assert points["m103_PhVphA"].unit == "dV"
    assert [p.name for p in device.points][-1] == "common_id"  # appended
    assert (device.manufacturer, device.model) == (MANUFACTURER, MODEL)
    assert {p.byte_order for p in device.points} == {"ABCD"}


def test_the_cache_round_trips_and_is_only_used_for_the_same_unit_and_link(
    tmp_path: Path,
) -> None:
    config = load_config(_write(tmp_path / "bridge.yaml", _doc(1)))
    path = cache_path(config.gateway.state_dir, "inverter")
    write_cache(path, _mapped(), "inverter")
    assert [p.name for p in path.parent.iterdir()] == ["inverter.yaml"]  # no temporary left
    device = config.device("inverter")
    assert read_cache(path, walked_from(config, device)) == _mapped()
    moved = load_config(_write(tmp_path / "bridge.yaml", _doc(2)))
    assert read_cache(path, walked_from(moved, moved.device("inverter"))) == (
        "not walked from this device (the SunSpec model chain of unit 1 on "
        "tcp://127.0.0.1:2)")
    assert read_cache(tmp_path / "none.yaml", walked_from(config, device)) is None
    # A copy is a map file like `m2m-bridge sunspec --write` makes.
    assert DeviceMap.model_validate(yaml.safe_load(path.read_text())).sunspec_base == 40000


def test_an_unreadable_cache_says_why(tmp_path: Path) -> None:
    path = tmp_path / "inverter.yaml"
    path.write_text("points: [{name: x, address: nope}]\n")
    why = read_cache(path, "SunSpec model chain of unit 1 on tcp://127.0.0.1:1")
    assert isinstance(why, str)
    assert why.startswith("not a map: ")


@contextlib.contextmanager
def _service(config: Config) -> Iterator[Service]:
    """A Service built, not run: its links have not connected, its publisher has not run."""
    service = Service(config)
    try:
        yield service
    finally:
        for link in service.links.values():
            link.close()
        service.buffer.close()


def test_a_service_starts_polling_the_cached_map(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path / "bridge.yaml", _doc(1)))
    write_cache(cache_path(config.gateway.state_dir, "inverter"), _mapped(), "inverter")
    with _service(config) as service:
        poller = service.pollers["inverter"]
        assert len(poller.device.points) == len(_mapped().points) + 1
        assert "inv" in service.links


def test_a_service_without_a_map_keeps_the_link_and_adds_the_device_once_mapped(
    tmp_path: Path,
) -> None:
    config = load_config(_write(tmp_path / "bridge.yaml", _doc(1)))
    with _service(config) as service:
        assert service.pollers == {}
        assert "inv" in service.links  # the walk's
        service.sunspec.maps["inverter"] = _mapped()
        assert service._remap() == ["device inverter added"]
        assert "inverter" in service.pollers
        assert service._remap() == []  # the same map again changes nothing
        # A reload keeps the map of a device on the same unit and link ...
        assert service.reload(load_config(_write(tmp_path / "bridge.yaml", _doc(1)))) == []
        assert "inverter" in service.pollers
        # ... and forgets it when the device moves (its walk will say what is there now).
        changes = service.reload(load_config(_write(tmp_path / "bridge.yaml", _doc(2))))
        assert "device inverter removed" in changes
        assert service.pollers == {}


def test_sparkplug_metrics_follow_a_mapping(tmp_path: Path) -> None:
    """A device mapped after start gets its metrics and aliases as a reload would add them;
    the other devices' aliases stay."""
    doc = _doc(1, mqtt={"format": "sparkplug", "sparkplug": {"group_id": "plant"}})
    doc["devices"].append({"name": "meter", "link": "inv", "unit": 2,
                           "points": [{"name": "volts", "address": 0}]})
    with _service(load_config(_write(tmp_path / "bridge.yaml", doc))) as service:
        assert service.metrics is not None
        assert list(service.metrics.devices) == ["meter"]
        volts = service.metrics.table
        service.sunspec.maps["inverter"] = _mapped()
        assert service._remap() == ["device inverter added"]
        inverter = service.metrics.device("inverter")
        assert inverter is not None
        assert {m.name for m in inverter.metrics} >= {"m103_Hz", "common_id"}
        assert set(volts) <= set(service.metrics.table)  # the meter's alias kept
        assert min(m.alias for m in inverter.metrics) > max(a for *_, a, _ in volts)
        assert service.node is not None


# --- the daemon, against the simulated inverter --------------------------------------------


def _log_events(daemon_log: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [e for e in daemon_log if e.get("event") == event]


def _readings(recorder: Recorder, point: str) -> list[Any]:
    return [v["value"] for v in recorder.values(f"t/inverter/{point}")]


def _config(tmp_path: Path, broker: Broker, port: int, **mqtt: Any) -> Path:
    return _write(tmp_path / "bridge.yaml", _doc(port, mqtt={"port": broker.port, **mqtt}))


@pytest.mark.integration
async def test_the_daemon_maps_a_sunspec_device_at_start_and_caches_its_map(
    tmp_path: Path, broker: Broker, daemons: Daemons,
) -> None:
    port = free_port()
    path = _config(tmp_path, broker, port)
    async with simulated(sunspec_config(unit=1, host="127.0.0.1", port=port)) as sim, \
            recording(broker.port, "t/#") as seen:
        daemon = daemons.start(path)
        await seen.wait_for(lambda: _readings(seen, "m103_Hz") and _readings(seen, "common_id"))
        assert _readings(seen, "m103_Hz")[0] == HERTZ  # scale factor applied
        assert _readings(seen, "m103_PhVphA")[0] == VOLTS * 10  # the device's own point
        assert _readings(seen, "common_id")[0] == 1
        assert seen.last("t/inverter/status") == b"online"
        mapped = _log_events(daemon.events(), "sunspec device mapped")
        assert len(mapped) == 1
        assert mapped[0]["models"] == [1, 103, 160]
        assert mapped[0]["points"] == len(_mapped().points)
        assert mapped[0]["changes"] == ["device inverter added"]
        cache = tmp_path / "state" / "sunspec" / "inverter.yaml"
        points = {p["name"]: p for p in yaml.safe_load(cache.read_text())["points"]}
        assert points["m103_Hz"]["scale_from"] == "m103_Hz_SF"
        # SIGHUP walks it again (a firmware update may have changed its scale factors).
        daemon.signal(signal.SIGHUP)
        await until(lambda: len(_log_events(daemon.events(), "sunspec device mapped")) == 2,
                    what=daemon.output)
        assert _log_events(daemon.events(), "sunspec device mapped")[1]["changes"] == [
            "map unchanged"]
        # The inverter changes a scale factor at run time (SolarEdge does): the same register
        # (5001) now publishes 5.001, its factor read with it at every poll.
        sim.set_value("inverter", "m103_Hz_SF", -3)
        await seen.wait_for(lambda: _readings(seen, "m103_Hz")[-1] == 5.001)
        sim.set_value("inverter", "m103_Hz_SF", -0x8000)  # not implemented: no value, no crash
        # A poll already under way may still read the old factor: count from two polls on.
        watts = len(_readings(seen, "m103_W"))
        await seen.wait_for(lambda: len(_readings(seen, "m103_W")) >= watts + 2)
        hertz, watts = len(_readings(seen, "m103_Hz")), len(_readings(seen, "m103_W"))
        await seen.wait_for(lambda: len(_readings(seen, "m103_W")) > watts + 2)
        assert len(_readings(seen, "m103_Hz")) == hertz
        assert daemon.running()


@pytest.mark.integration
async def test_an_absent_inverter_is_offline_then_mapped_when_it_answers(
    tmp_path: Path, broker: Broker, daemons: Daemons,
) -> None:
    port = free_port()
    path = _config(tmp_path, broker, port)
    async with recording(broker.port, "t/#") as seen:
        daemon = daemons.start(path)
        await seen.wait_for(lambda: seen.last("t/inverter/status") == b"offline")
        failed = _log_events(daemon.events(), "sunspec mapping failed, retrying")
        assert [(e["device"], e["mapped"]) for e in failed] == [("inverter", False)]
        assert "connection failed" in failed[0]["error"]
        assert not (tmp_path / "state" / "sunspec").exists()
        async with simulated(sunspec_config(unit=1, host="127.0.0.1", port=port)):
            await seen.wait_for(lambda: _readings(seen, "m103_Hz"))
            await seen.wait_for(lambda: seen.last("t/inverter/status") == b"online")
        assert daemon.running()
        # One line per change of state, not per attempt.
        assert len(_log_events(daemon.events(), "sunspec mapping failed, retrying")) == 1
        assert (tmp_path / "state" / "sunspec" / "inverter.yaml").exists()


@pytest.mark.integration
async def test_a_restart_with_the_inverter_asleep_polls_the_cached_map(
    tmp_path: Path, broker: Broker, daemons: Daemons,
) -> None:
    port = free_port()
    path = _config(tmp_path, broker, port, homeassistant={})
    discovery = "homeassistant/device/gw_inverter/config"
    async with simulated(sunspec_config(unit=1, host="127.0.0.1", port=port)), \
            recording(broker.port, "t/#") as seen:
        first = daemons.start(path)
        await seen.wait_for(lambda: _readings(seen, "m103_Hz"))
        first.signal(signal.SIGTERM)
        assert first.wait() == 0
    # Night: the inverter sleeps; the gateway restarts.
    async with recording(broker.port, "#") as seen:
        second = daemons.start(path)
        await second.ready()
        # Polled and silent (the retained `offline` is the first daemon's clean stop's).
        await until(lambda: bool(_log_events(second.events(), "device offline")),
                    what=second.output)
        cached = _log_events(second.events(), "sunspec device mapped from its cache")
        assert [e["points"] for e in cached] == [len(_mapped().points)]
        # Its points are known: Home Assistant is told about them while it sleeps.
        await seen.wait_for(lambda: seen.last(discovery))
        document = json.loads(seen.last(discovery) or b"{}")
        assert {"m103_Hz", "m103_PhVphA", "common_id"} <= set(document["cmps"])
        assert document["dev"]["manufacturer"] == MANUFACTURER
        # Morning: it answers; its readings flow without a restart, the map as it was.
        async with simulated(sunspec_config(unit=1, host="127.0.0.1", port=port)):
            await seen.wait_for(lambda: _readings(seen, "m103_Hz"))
            await until(lambda: bool(_log_events(second.events(), "sunspec device mapped")),
                        what=second.output)
        assert _readings(seen, "m103_Hz")[0] == HERTZ
        mapped = _log_events(second.events(), "sunspec device mapped")
        assert [e["changes"] for e in mapped] == [["map unchanged"]]
        assert second.running()
