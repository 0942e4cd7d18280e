"""The CLI loads only what a command needs (DESIGN.md: `--help` under 100 ms, a one-off `read`
under 150 ms). Proved by the modules a real run imports, never by timing: these machines are
too noisy for a timed assertion, and an import is what costs the time."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import WAIT, Broker, Daemons, cli, free_port, run_cli, simulated, until

# What the daemon and the config need, and `--help` or `read URL` never should: pydantic
# (the config models), yaml (the config file), aiomqtt/paho (the broker), prometheus_client
# (metrics), rich (a dev-only dependency structlog would pick up).
DAEMON_ONLY = frozenset({"pydantic", "pydantic_core", "yaml", "aiomqtt", "paho",
                         "prometheus_client", "rich"})
# Modules no command and no daemon has a use for, each ~0.2-0.7 MiB of RSS: shutil (argparse
# sizes its help with it, bringing zlib, bz2 and lzma), importlib.resources and tempfile (the
# device library's folder), difflib (a mistyped map name), typing_extensions (a TypeVar default).
UNUSED = frozenset({"shutil", "tempfile", "importlib.resources", "difflib", "typing_extensions"})
# ... and what only a command that does I/O and logs needs.
RUNTIME = frozenset({"asyncio", "pymodbus", "serial", "structlog"})
# A sitecustomize (run at interpreter start) that lists, at exit, every module the process
# holds: the CLI itself runs unchanged, as `python -m bridge`. (-X importtime would also list
# imports that failed, such as structlog's optional ones.)
SITECUSTOMIZE = """\
import atexit, sys
atexit.register(lambda: print("modules:", *sorted(sys.modules), file=sys.stderr))
"""


@pytest.fixture
def listing(tmp_path: Path) -> dict[str, str]:
    """The environment that makes a CLI run print the modules it loaded."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}


def held(stderr: str) -> set[str]:
    """Every module a run held at exit."""
    line = next(line for line in stderr.splitlines() if line.startswith("modules: "))
    return set(line.split()[1:])


def imported(stderr: str) -> set[str]:
    """The top-level packages a run held at exit."""
    return {name.split(".")[0] for name in held(stderr)}


def messages(stderr: str) -> str:
    """stderr without the module list: what the user saw."""
    return "\n".join(line for line in stderr.splitlines() if not line.startswith("modules: "))


@pytest.fixture
async def device(tmp_path: Path) -> AsyncIterator[int]:
    """A simulated Modbus TCP device, unit 3, holding register 10 = 215; its port."""
    port = free_port()
    path = tmp_path / "bridge.yaml"
    path.write_text(yaml.safe_dump({
        "version": 1,
        "links": [{"name": "plc", "type": "tcp", "host": "127.0.0.1", "port": port}],
        "devices": [{"name": "meter", "link": "plc", "unit": 3,
                     "points": [{"name": "temp", "address": 10, "type": "int16"}]}],
    }))
    async with simulated(path, {"meter": {"temp": 215}}):
        yield port


@pytest.mark.integration
@pytest.mark.parametrize("args", [
    ("--help",),
    ("--version",),
    ("read", "--help"),
    ("scan", "--help"),
    ("discover", "--help"),
])
def test_help_loads_no_runtime(args: tuple[str, ...], listing: dict[str, str]) -> None:
    """Help and version load neither the config models nor any I/O library, nor logging."""
    r = run_cli(*args, env=listing)
    assert r.returncode == 0, messages(r.stderr)
    assert r.stdout
    assert imported(r.stderr) & (DAEMON_ONLY | RUNTIME | UNUSED) == set()


@pytest.mark.integration
def test_usage_error_loads_no_runtime(listing: dict[str, str]) -> None:
    """A mistyped command line is refused (exit 2) before anything heavy is imported."""
    r = run_cli("read", "tcp://127.0.0.1:502", "--unit", "x", env=listing)
    assert r.returncode == 2
    assert "--unit: invalid int value: 'x'" in messages(r.stderr)
    assert imported(r.stderr) & (DAEMON_ONLY | RUNTIME) == set()


@pytest.mark.integration
async def test_url_read_loads_no_config_or_broker(
    device: int, listing: dict[str, str]
) -> None:
    """`read URL` reads through pymodbus without the config models, MQTT or metrics."""
    r = await cli("read", f"tcp://127.0.0.1:{device}", "--unit", "3", "--address", "10",
                  "--type", "int16", "--json", env=listing)
    assert r.returncode == 0, messages(r.stderr)
    assert r.stdout.strip() == '[{"address": 10, "value": 215}]'
    modules = imported(r.stderr)
    assert modules & DAEMON_ONLY == set()
    assert {"pymodbus", "structlog"} <= modules  # the run went through the real client


@pytest.mark.integration
def test_config_commands_still_load_the_config(
    tmp_path: Path, listing: dict[str, str]
) -> None:
    """The lazy imports lose nothing: `validate` loads the models and reports as before."""
    path = tmp_path / "bridge.yaml"
    path.write_text("version: 1\nlinks: []\ndevices: []\n")
    r = run_cli("validate", "-c", str(path), env=listing)
    assert r.returncode == 0, messages(r.stderr)
    assert r.stdout.strip() == f"{path}: ok (0 links, 0 devices, 0 points)"
    assert {"pydantic", "yaml"} <= imported(r.stderr)


# The daemon holds only what its config uses (DESIGN.md: under 35 MiB RSS; bench/rss.py says
# what each costs): protobuf with `format: sparkplug`, prometheus_client with `metrics:`,
# aiomqtt and paho on an MQTT 3.1.1 session. A run's modules at exit prove it, both ways.
OPTIONAL = frozenset({"google", "prometheus_client", "aiomqtt", "paho"})
# ... and what no daemon holds unless a device has `map: sunspec`: the config is read in a
# child (bridge.config.apart), so YAML, the loader and pydantic's validator building (its
# plugin loader brings importlib.metadata) stay out of the long-lived process.
LOADER = frozenset({"yaml", "bridge.config.loader", "bridge.config.yamlsource",
                    "pydantic.plugin._loader"})


def daemon_config(tmp_path: Path, device: int, broker: int, **extra: Any) -> Path:
    mqtt: dict[str, Any] = {"host": "127.0.0.1", "port": broker}
    mqtt.update(extra.pop("mqtt", {}))
    path = tmp_path / "bridge.yaml"
    path.write_text(yaml.safe_dump({
        "version": 1,
        "gateway": {"id": "gw", "state_dir": str(tmp_path / "state")},
        "mqtt": mqtt,
        "links": [{"name": "plc", "type": "tcp", "host": "127.0.0.1", "port": device}],
        "devices": [{"name": "meter", "link": "plc", "unit": 3, "interval": 0.2,
                     "points": [{"name": "temp", "address": 10, "type": "int16"}]}],
        **extra,
    }))
    return path


async def run_until_polled(daemons: Daemons, config: Path, listing: dict[str, str]) -> set[str]:
    """Run the daemon until it is connected and its device polled, stop it (SIGTERM, exit 0);
    the modules it held."""
    daemon = daemons.start(config, env=listing)
    await daemon.ready()
    await until(lambda: bool(daemon.events("broker connected") and daemon.events("device online")),
                WAIT, lambda: f"a connection and a poll; the log:\n{daemon.output()}")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0, daemon.output()
    return held(daemon.output())


@pytest.mark.integration
async def test_a_json_daemon_holds_no_protobuf_metrics_or_aiomqtt(
    tmp_path: Path, device: int, broker: Broker, daemons: Daemons, listing: dict[str, str]
) -> None:
    """JSON messages on an MQTT 5 broker without `metrics:`: none of the optional packages,
    and nothing of the config loader."""
    config = daemon_config(tmp_path, device, broker.port, mqtt={"messages": "per-device"})
    modules = await run_until_polled(daemons, config, listing)
    assert {m.split(".")[0] for m in modules} & OPTIONAL == set()
    assert modules & LOADER == set()
    assert modules & UNUSED == set()
    # Its config came from the loader's child as frozen objects (bridge.config.frozen).
    assert {m.split(".")[0] for m in modules} & {"pydantic", "pydantic_core"} == set()
    assert {"mqtt5", "pymodbus"} <= modules  # it ran on our wire client and the real Modbus


@pytest.mark.integration
async def test_a_daemon_loads_what_its_config_asks_for(
    tmp_path: Path, device: int, broker: Broker, daemons: Daemons, listing: dict[str, str]
) -> None:
    """Sparkplug, metrics and MQTT 3.1.1 still load protobuf, prometheus_client and aiomqtt."""
    config = daemon_config(
        tmp_path, device, broker.port,
        mqtt={"protocol": "3.1.1", "format": "sparkplug", "sparkplug": {"group_id": "g"}},
        metrics={"host": "127.0.0.1", "port": free_port()},
    )
    modules = await run_until_polled(daemons, config, listing)
    assert {m.split(".")[0] for m in modules} >= OPTIONAL
