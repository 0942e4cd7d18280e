"""The daemon's config load in a child process (bridge.config.apart), and equal points shared
across devices (bridge.config.loader.share_points): what the daemon runs is what an
in-process load gives, value for value, in frozen objects that need no pydantic
(bridge.config.frozen); errors stay located, and a loader that dies is one line."""

from __future__ import annotations

import pickle
import textwrap
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, SecretStr

from bridge.config import Config, load_config
from bridge.config.apart import freeze, load_config_apart
from bridge.config.frozen import Frozen, Secret, is_line, is_serial
from bridge.errors import ConfigError

pytestmark = pytest.mark.integration  # each load starts a child process

CONFIG = """\
version: 1
gateway: {id: gw-7}
mqtt:
  host: 127.0.0.1
  username: bridge
  password: "${env:APART_SECRET}"
  tls: {ca_file: /etc/ssl/certs/ca-certificates.crt}
  homeassistant: {}
  buffer: {max_bytes: 16MiB, max_age: 2d}
metrics: {port: 9200}
links:
  - {name: net, type: tcp, host: 127.0.0.1}
  - {name: rs485, type: rtu, port: /dev/ttyUSB7, baudrate: 19200, parity: E}
  - {name: scale-line, type: serial, port: /dev/ttyUSB8}
devices:
  - name: scale
    link: scale-line
    request: "W\\r\\n"
    response: "(?P<weight>[0-9.]+) kg"
    points: [{name: weight, type: float32, unit: kg}]
  - name: drive
    link: rs485
    interval: 250ms
    points:
      - {name: state, address: 5, values: {0: stopped, 1: running}, ha: {icon: "mdi:fan"}}
      - {name: speed, address: 6, writable: true, min: 0, max: 1500, simulate: {value: 900}}
  - name: meter-1
    link: net
    unit: 1
    points: &points
      - {name: voltage, address: 0, type: uint16, scale: 0.1, unit: V}
      - {name: energy, address: 1, type: float32}
  - name: meter-2
    link: net
    unit: 2
    points: *points
  - name: pump
    link: net
    unit: 3
    points:
      - {name: voltage, address: 0, type: uint16, scale: 0.1, unit: V}
      - {name: speed, address: 40001, type: uint16}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bridge.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_the_child_gives_what_an_in_process_load_gives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Devices, points, warnings (the Modicon-style address), secrets to redact and the
    source path all arrive, equal to load_config's."""
    monkeypatch.setenv("APART_SECRET", "s3cret-apart")
    path = write(tmp_path, CONFIG)
    here = load_config(path)
    apart = load_config_apart(path)
    assert_same(here, apart)
    assert isinstance(apart, Frozen)
    assert apart.source == here.source == str(path)
    assert [str(w) for w in apart.warnings] == [str(w) for w in here.warnings]
    assert apart.warnings, "the 40001 address should warn"
    assert "s3cret-apart" in apart.secrets
    assert apart.mqtt.password is not None
    assert apart.mqtt.password.get_secret_value() == "s3cret-apart"
    assert "s3cret-apart" not in repr(apart)  # logged by mistake, it stays masked
    # What the models offer beyond their fields, alike.
    rs485 = apart.link("rs485")
    assert is_serial(rs485)
    assert rs485.baudrate == 19200
    assert apart.device("drive").points[1].size == here.device("drive").points[1].size == 1
    assert [p.order for d in apart.devices for p in d.points] == [
        p.order for d in here.devices for p in d.points]
    with pytest.raises(KeyError):
        apart.device("nope")
    for config in (here, apart):
        assert [(is_serial(link), is_line(link)) for link in config.links] == [
            (False, False), (True, False), (False, True)]


def assert_same(model: object, twin: object, where: str = "config") -> None:
    """`twin` is `model` frozen: the same class name, and every field (private ones
    included) the same value, all the way down."""
    if isinstance(model, BaseModel):
        assert isinstance(twin, Frozen), where
        assert type(twin).__name__ == type(model).__name__, where
        for name in (*type(model).model_fields, *type(model).__private_attributes__):
            assert_same(getattr(model, name), getattr(twin, name), f"{where}.{name}")
    elif isinstance(model, SecretStr):
        assert isinstance(twin, Secret), where
        assert twin.get_secret_value() == model.get_secret_value(), where
    elif isinstance(model, list | tuple):
        assert type(twin) is type(model), where
        assert len(twin) == len(model), where
        for n, (a, b) in enumerate(zip(model, twin, strict=True)):
            assert_same(a, b, f"{where}[{n}]")
    elif isinstance(model, dict):
        assert isinstance(twin, dict), where
        assert list(twin) == list(model), where
        for key in model:
            assert_same(model[key], twin[key], f"{where}[{key!r}]")
    else:
        assert type(twin) is type(model), where
        assert twin == model, where


def test_the_daemons_config_compares_and_copies_as_the_models_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reload compares the new config with the running one part by part and the service
    copies it with changes: equal files give equal (and equally hashed) parts, a change
    is seen, a copy changes what it is told and nothing else, and nothing can be set."""
    monkeypatch.setenv("APART_SECRET", "s3cret-apart")
    path = write(tmp_path, CONFIG)
    first, again = load_config_apart(path), load_config_apart(path)
    assert first == again
    assert first.mqtt == again.mqtt
    assert first.devices == again.devices
    point, same = first.device("drive").points[1], again.device("drive").points[1]
    assert hash(point) == hash(same)
    assert len({point, same}) == 1
    changed = load_config_apart(write(tmp_path, CONFIG.replace("max: 1500", "max: 1400")))
    assert changed.device("drive") != first.device("drive")
    assert changed.links == first.links
    assert changed.mqtt == first.mqtt
    copy = first.model_copy(update={"devices": first.devices[:1]})
    assert copy.devices == first.devices[:1]
    assert (copy.mqtt, copy.links, copy.source, copy.secrets) == (
        first.mqtt, first.links, first.source, first.secrets)
    assert first.devices != copy.devices  # the original is untouched
    with pytest.raises(AttributeError, match="frozen"):
        point.max = 1
    # A frozen config pickles too (the daemon never needs to; nothing stops it).
    assert pickle.loads(pickle.dumps(first)) == first


def test_freezing_in_process_gives_what_the_child_sends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the daemon merges in at run time (a SunSpec device's map) is frozen in process
    and then equal to what the child would have sent."""
    monkeypatch.setenv("APART_SECRET", "x")
    path = write(tmp_path, CONFIG)
    here: Config = load_config(path)
    frozen: Any = freeze(here)
    assert_same(here, frozen)
    assert frozen == load_config_apart(path)


def test_equal_points_are_one_object_across_devices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """meter-1 and meter-2 have the same points: the daemon holds them once; pump's equal
    `voltage` is shared too, its own `speed` is not anyone else's."""
    monkeypatch.setenv("APART_SECRET", "x")
    path = write(tmp_path, CONFIG)
    for config in (load_config(path), load_config_apart(path)):
        one, two, pump = (config.device(name) for name in ("meter-1", "meter-2", "pump"))
        assert all(a is b for a, b in zip(one.points, two.points, strict=True))
        assert pump.points[0] is one.points[0]
        assert pump.points[1] not in one.points
        assert [p.name for p in pump.points] == ["voltage", "speed"]


def test_errors_come_back_located(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad file: the same located issues as in process, as a ConfigError."""
    monkeypatch.setenv("APART_SECRET", "x")
    path = write(tmp_path, CONFIG.replace("unit: 2", "unit: 300"))
    with pytest.raises(ConfigError) as here:
        load_config(path)
    with pytest.raises(ConfigError) as apart:
        load_config_apart(path)
    assert [str(i) for i in apart.value.issues] == [str(i) for i in here.value.issues]
    line = CONFIG.splitlines().index("    unit: 2") + 1
    assert any(i.line == line and "unit" in i.path for i in apart.value.issues)


def test_a_loader_that_dies_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The child cannot even start its import (a broken interpreter environment): a
    ConfigError naming the file and the child's last line, no traceback."""
    monkeypatch.setenv("APART_SECRET", "x")
    path = write(tmp_path, CONFIG)
    monkeypatch.setattr("sys.executable", "/bin/false")
    with pytest.raises(ConfigError) as caught:
        load_config_apart(path)
    (issue,) = caught.value.issues
    assert issue.file == str(path)
    assert issue.message == "the config loader failed: exit status 1"
