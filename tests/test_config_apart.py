"""The daemon's config load in a child process (bridge.config.apart), and equal points shared
across devices (bridge.config.loader.share_points): what the daemon runs is what an
in-process load gives, errors stay located, and a loader that dies is one line."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from bridge.config import load_config
from bridge.config.apart import load_config_apart
from bridge.errors import ConfigError

pytestmark = pytest.mark.integration  # each load starts a child process

CONFIG = """\
version: 1
mqtt: {host: 127.0.0.1, username: bridge, password: "${env:APART_SECRET}"}
links:
  - {name: net, type: tcp, host: 127.0.0.1}
devices:
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
    assert apart == here
    assert apart.source == here.source == str(path)
    assert [str(w) for w in apart.warnings] == [str(w) for w in here.warnings]
    assert apart.warnings, "the 40001 address should warn"
    assert "s3cret-apart" in apart.secrets
    assert apart.mqtt.password is not None
    assert apart.mqtt.password.get_secret_value() == "s3cret-apart"


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
    assert any(i.line == 14 and "unit" in i.path for i in apart.value.issues)


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
