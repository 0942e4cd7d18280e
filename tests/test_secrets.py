"""Secrets (`${env:…}`, `${file:…}`, `${credential:…}`) never leave the process: not in
`validate` output, not in config errors, not in the daemon's logs at debug level, not in a
traceback's local variables.

Every secret value here contains MARK, so one substring search finds any leak.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.config import load_config
from bridge.errors import ConfigError
from bridge.logs import configure
from tests.helpers import Broker, Daemon, examples, free_port, metrics, mosquitto, until

MARK = "ZZ9q"
PASSWORD = f"pw-{MARK}-correct-horse"
USERNAME = f"user-{MARK}"


def base_config(broker_port: int = 1883, device_port: int = 1502) -> dict[str, Any]:
    """A valid config touching most of the format, including a map file (maps/meter.yaml)."""
    return {
        "version": 1,
        "gateway": {"id": "sec", "state_dir": "state"},
        "mqtt": {
            "host": "127.0.0.1", "port": broker_port, "username": "bridge",
            "password": "plain", "protocol": 5, "keepalive": "30s", "qos": 1,
            "format": "json", "topic_prefix": "m2m/sec",
            "buffer": {"max_messages": 1000, "max_bytes": "1MiB", "max_age": "1d"},
        },
        "links": [
            {"name": "plc", "type": "tcp", "host": "127.0.0.1", "port": device_port,
             "timeout": "300ms", "max_registers": 100, "max_gap": 4},
            {"name": "bus", "type": "rtu", "port": "/dev/ttyUSB0", "baudrate": 19200,
             "parity": "E"},
        ],
        "devices": [
            {"name": "meter", "link": "plc", "unit": 1, "interval": "200ms",
             "map": "maps/meter.yaml", "byte_order": "CDAB", "report": "on-change",
             "heartbeat": "1m",
             "points": [
                 {"name": "voltage", "table": "input", "address": 0, "type": "float32",
                  "unit": "V", "deadband": 0.5},
                 {"name": "state", "address": 40, "values": {0: "stopped", 1: "running"}},
                 {"name": "serial", "address": 20, "type": "string", "count": 4},
                 {"name": "setpoint", "address": 50, "type": "float32", "writable": True,
                  "min": 0, "max": 100},
             ]},
        ],
    }


MAP = {"manufacturer": "Acme", "byte_order": "ABCD",
       "points": [{"name": "energy", "address": 100, "type": "uint32", "unit": "kWh"}]}


def leaves(data: Any, at: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Paths of every scalar value in `data`."""
    if isinstance(data, dict):
        for key, value in data.items():
            yield from leaves(value, (*at, key))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            yield from leaves(value, (*at, index))
    else:
        yield at


def put(data: Any, path: tuple[Any, ...], value: Any) -> None:
    for part in path[:-1]:
        data = data[part]
    data[path[-1]] = value


BASE_LEAVES = list(leaves(base_config()))
SECRET_VALUES = st.sampled_from([
    f"{MARK}",  # a valid name
    f"secret {MARK} with spaces",
    f"{MARK}/../x:7",
    f"99{MARK}",
    f"-{MARK}-" * 20,
    f"ms{MARK}",
])


class SecretWorld:
    """Where the three kinds of references resolve: environ, files and a credentials dir."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.credentials = root / "credentials"
        self.credentials.mkdir(parents=True, exist_ok=True)
        (root / "maps").mkdir(exist_ok=True)
        (root / "maps" / "meter.yaml").write_text(yaml.safe_dump(MAP))
        self.environ: dict[str, str] = {"CREDENTIALS_DIRECTORY": str(self.credentials)}
        self.count = 0

    def reference(self, source: str, value: str) -> str:
        self.count += 1
        name = f"S{self.count}"
        if source == "env":
            self.environ[name] = value
            return f"${{env:{name}}}"
        if source == "file":
            path = self.root / f"secret-{name}"
            path.write_text(value + "\n")
            return f"${{file:{path}}}"
        (self.credentials / name).write_text(value)
        return f"${{credential:{name}}}"


@settings(max_examples=examples(150), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    substitutions=st.lists(
        st.tuples(st.sampled_from(BASE_LEAVES), st.sampled_from(["env", "file", "credential"]),
                  SECRET_VALUES, st.booleans()),
        min_size=1, max_size=4,
    ),
    duplicate_device=st.booleans(),
)
def test_secret_values_never_appear_in_config_errors(
    tmp_path: Path,
    substitutions: list[tuple[tuple[Any, ...], str, str, bool]],
    duplicate_device: bool,
) -> None:
    """Put secret references anywhere (whole values or part of one), with values valid or
    not for the key: loading succeeds or raises ConfigError, and no message holds a value."""
    world = SecretWorld(tmp_path)
    data = base_config()
    for path, source, value, partial in substitutions:
        reference = world.reference(source, value)
        put(data, path, f"x{reference}" if partial else reference)
    if duplicate_device:
        data["devices"].append(copy.deepcopy(data["devices"][0]))
    file = tmp_path / "bridge.yaml"
    file.write_text(yaml.safe_dump(data, sort_keys=False))
    errors = ""
    try:
        config = load_config(file, environ=world.environ)
    except ConfigError as exc:
        errors = str(exc)
    else:  # loaded: the password (a secret or not) is masked wherever the model is shown
        assert config.mqtt.password is not None
        assert MARK not in repr(config.mqtt.password)
    assert MARK not in errors, errors


def secret_config(tmp_path: Path, broker_port: int, password_ref: str) -> Path:
    data = base_config(broker_port, free_port())
    data["mqtt"]["username"] = "${env:MQTT_USER}"
    data["mqtt"]["password"] = password_ref
    data["gateway"]["state_dir"] = str(tmp_path / "state")
    data["links"] = data["links"][:1]
    (tmp_path / "maps").mkdir(exist_ok=True)
    (tmp_path / "maps" / "meter.yaml").write_text(yaml.safe_dump(MAP))
    path = tmp_path / "bridge.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def secret_sources(tmp_path: Path) -> dict[str, str]:
    """The password behind each kind of reference (references as keys), plus the env."""
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "mqtt_password").write_text(PASSWORD + "\n")
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    return {
        "${env:MQTT_PASSWORD}": "env",
        f"${{file:{tmp_path / 'pw'}}}": "file",
        "${credential:mqtt_password}": "credential",
    }


def env_for(tmp_path: Path) -> dict[str, str]:
    return {"MQTT_USER": USERNAME, "MQTT_PASSWORD": PASSWORD,
            "CREDENTIALS_DIRECTORY": str(tmp_path / "credentials")}


@pytest.mark.integration
@pytest.mark.parametrize("source", ["env", "file", "credential"])
def test_validate_never_prints_secrets(
    tmp_path: Path, secret_sources: dict[str, str], source: str
) -> None:
    reference = next(r for r, s in secret_sources.items() if s == source)
    config = secret_config(tmp_path, 1883, reference)
    result = subprocess.run(
        [*run_cli_argv(), "--log-level", "debug", "validate", "-c", str(config)],
        capture_output=True, text=True, env=full_env(tmp_path), timeout=30, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout
    assert MARK not in result.stdout + result.stderr


@pytest.mark.integration
def test_validate_errors_next_to_secrets_show_none(
    tmp_path: Path, secret_sources: dict[str, str]
) -> None:
    """Errors on the secret-bearing keys themselves, and right beside them: exit 78, every
    error listed, no value shown."""
    config = secret_config(tmp_path, 1883, "${credential:mqtt_password}")
    data = yaml.safe_load(config.read_text())
    data["mqtt"]["port"] = "${env:MQTT_PASSWORD}"  # not a number
    data["mqtt"]["protocol"] = "${env:MQTT_USER}"  # not 5 or 3.1.1
    data["mqtt"]["qos"] = 7
    data["gateway"]["id"] = "${file:" + str(tmp_path / "pw") + "}"
    data["devices"][0]["link"] = "${env:MQTT_USER}"  # names no link
    data["devices"][0]["map"] = "${env:MQTT_USER}"  # no such map file
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    result = subprocess.run(
        [*run_cli_argv(), "validate", "-c", str(config)],
        capture_output=True, text=True, env=full_env(tmp_path), timeout=30, check=False,
    )
    assert result.returncode == 78, result.stderr
    errors = result.stderr.strip().splitlines()
    assert len(errors) >= 5, result.stderr
    assert all("bridge.yaml:" in line for line in errors), result.stderr
    assert "<secret>" in result.stderr
    assert MARK not in result.stdout + result.stderr


@pytest.mark.integration
def test_missing_secret_error_names_the_reference_only(tmp_path: Path) -> None:
    config = secret_config(tmp_path, 1883, "${credential:mqtt_password}")
    env = full_env(tmp_path) | {"CREDENTIALS_DIRECTORY": str(tmp_path / "nowhere")}
    result = subprocess.run(
        [*run_cli_argv(), "validate", "-c", str(config)],
        capture_output=True, text=True, env=env, timeout=30, check=False,
    )
    assert result.returncode == 78
    assert "${credential:mqtt_password}" in result.stderr
    assert MARK not in result.stderr


@pytest.fixture
def password_broker(tmp_path: Path) -> Iterator[Broker]:
    """mosquitto that knows USERNAME with another password than the one the bridge sends."""
    passwd = tmp_path / "mosquitto.passwd"
    passwd.write_text("")
    exe = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    subprocess.run([exe, "-b", str(passwd), USERNAME, "the-real-one"], check=True)
    with mosquitto(tmp_path, extra=f"password_file {passwd}\n") as broker:
        yield broker


@pytest.mark.integration
@pytest.mark.parametrize("source", ["env", "file", "credential"])
async def test_daemon_debug_log_never_holds_secrets(
    tmp_path: Path, password_broker: Broker, secret_sources: dict[str, str], source: str
) -> None:
    """`run --log-level debug` against a broker that refuses the password: the refusal is
    logged, and neither the password nor the username appear anywhere on stderr."""
    reference = next(r for r, s in secret_sources.items() if s == source)
    config = secret_config(tmp_path, password_broker.port, reference)
    metrics_port = free_port()
    data = yaml.safe_load(config.read_text())
    data["metrics"] = {"host": "127.0.0.1", "port": metrics_port}
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    daemon = Daemon(config, log_level="debug")
    daemon.start(env=env_for(tmp_path))

    async def refused_twice() -> bool:
        # The refusal logged, and a second attempt refused: their debug lines are written.
        daemon.running()
        if '"broker refused login"' not in daemon.output():
            return False
        return (await metrics(metrics_port)).get("m2m_mqtt_reconnects_total", 0) >= 2

    try:
        await until(refused_twice, what=lambda: f"two refused logins; log:\n{daemon.output()}")
    finally:
        daemon.stop()
    output = daemon.output()
    assert '"debug"' in output or '"info"' in output
    assert PASSWORD not in output
    assert USERNAME not in output
    assert MARK not in output


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """configure() changes structlog and the root logger: put both back."""
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.configure(**saved)
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("as_json", [True, False])
def test_logged_tracebacks_never_show_local_variables(
    as_json: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A traceback logged with log.exception is plain: a local holding a secret stays out."""
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    configure(level="debug", json=as_json)
    log = structlog.get_logger("test")

    def connect() -> None:
        password = PASSWORD  # noqa: F841 - the local a rich/dict traceback would print
        raise RuntimeError("boom")

    try:
        connect()
    except RuntimeError:
        log.exception("poll failed unexpectedly")
        logging.getLogger("some.library").error("callback failed", exc_info=True)
    lines = stream.getvalue()
    if as_json:  # one JSON object a line, library records included
        records = [json.loads(line) for line in lines.splitlines()]
        assert [r["event"] for r in records] == ["poll failed unexpectedly", "callback failed"]
        assert all("RuntimeError: boom" in r["exception"] for r in records)
    else:
        assert lines.count("RuntimeError: boom") == 2
    assert MARK not in lines


def run_cli_argv() -> list[str]:
    return [sys.executable, "-m", "bridge"]


def full_env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, **env_for(tmp_path)}
