"""What `validate` and `run` check before anything runs, and a reload that never stalls the
daemon: an unusable state_dir, Modicon-style addresses, secrets that would block, a slow
config on SIGHUP. Each as an integrator meets it: the CLI or the daemon as a subprocess."""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import (
    Broker,
    Daemon,
    Recorder,
    free_port,
    recording,
    run_cli,
    simulated,
    until,
)

pytestmark = pytest.mark.integration  # starts processes or socket servers

EXIT_CONFIG = 78


def config_doc(broker: int = 1883, device: int = 1502, **gateway: Any) -> dict[str, Any]:
    return {
        "version": 1,
        "gateway": {"id": "start", **gateway},
        "mqtt": {"host": "127.0.0.1", "port": broker},
        "links": [{"name": "plc", "type": "tcp", "host": "127.0.0.1", "port": device,
                   "timeout": "300ms"}],
        "devices": [{"name": "a", "link": "plc", "unit": 1, "interval": "100ms",
                     "points": [{"name": "v", "address": 0}]}],
    }


def write_config(tmp_path: Path, doc: dict[str, Any]) -> Path:
    path = tmp_path / "bridge.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A read-only tmpfs mounted for the test: what a `ProtectSystem=strict` path looks like.
    (chmod is no test here: root writes through it.)"""
    where = tmp_path / "ro"
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(where)],
        capture_output=True, text=True, check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def one_line_refusal(result: subprocess.CompletedProcess[str], *, names: str) -> str:
    """The single stderr line of a refused command: exit 78, no traceback."""
    assert result.returncode == EXIT_CONFIG, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert names in lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("state_dir", "reason"),
    [("/proc/nope", "No such file or directory"), ("bridge.yaml/x", "not a directory")],
)
def test_validate_refuses_a_state_dir_it_cannot_create(
    tmp_path: Path, state_dir: str, reason: str
) -> None:
    config = write_config(tmp_path, config_doc(state_dir=state_dir))
    line = one_line_refusal(run_cli("validate", "-c", str(config)), names="gateway.state_dir")
    assert reason in line


def test_validate_and_run_refuse_a_read_only_state_dir(
    tmp_path: Path, read_only_dir: Path
) -> None:
    """Exit 78 naming the path and the reason; `run` never connects to the device."""
    device = socket.socket()
    device.bind(("127.0.0.1", 0))
    device.listen(8)
    device.setblocking(False)
    with device:
        doc = config_doc(device=device.getsockname()[1], state_dir=str(read_only_dir / "s"))
        config = write_config(tmp_path, doc)
        line = one_line_refusal(run_cli("validate", "-c", str(config)), names=str(read_only_dir))
        assert "Read-only file system" in line
        one_line_refusal(run_cli("run", "-c", str(config)), names="Read-only file system")
        # A connection the daemon made would wait in the backlog even after it exited.
        with pytest.raises(BlockingIOError):
            device.accept()


def test_run_refuses_a_buffer_that_is_not_a_database(tmp_path: Path) -> None:
    """A state file SQLite cannot open is one line and exit 78, not a traceback."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "buffer.sqlite3").write_bytes(b"this is not a database " * 100)
    config = write_config(tmp_path, config_doc(state_dir=str(state)))
    line = one_line_refusal(run_cli("run", "-c", str(config)), names="buffer.sqlite3")
    assert "cannot open the buffer" in line


def test_validate_warns_of_modicon_addresses_and_passes(tmp_path: Path) -> None:
    """Legal but suspicious: exit 0, the warning on stderr with the likely address."""
    doc = config_doc(state_dir=str(tmp_path / "state"))
    doc["devices"][0]["points"].append({"name": "w", "address": 40015})
    result = run_cli("validate", "-c", str(write_config(tmp_path, doc)))
    assert result.returncode == 0, result.stderr
    assert "devices[0].points[1].address: warning: Modicon numbering? holding 40015 is " \
        "usually address 14" in result.stderr


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_a_secret_that_would_block_is_refused_at_once(
    tmp_path: Path, kind: str, command: str
) -> None:
    """A FIFO would wait for a writer and /dev/zero never ends: refused in one line, exit 78,
    well inside the 30 s the test allows (it hung for ever, or read 3 GB, before)."""
    secret = tmp_path / "pw"
    if kind == "fifo":
        os.mkfifo(secret)
    else:
        secret.symlink_to("/dev/zero")
    doc = config_doc(state_dir=str(tmp_path / "state"))
    doc["mqtt"]["password"] = f"${{file:{secret}}}"
    result = run_cli(command, "-c", str(write_config(tmp_path, doc)), timeout=30)
    line = one_line_refusal(result, names="mqtt.password")
    assert "not a regular file" in line


@dataclass
class Running:
    """A daemon polling one simulated point every 100 ms, and a recorder of its readings."""

    doc: dict[str, Any]
    path: Path
    daemon: Daemon
    rec: Recorder
    topic: str = "m2m/start/a/v"

    def readings(self) -> list[bytes]:
        return self.rec.payloads(self.topic)


@pytest.fixture
async def running(tmp_path: Path, broker: Broker) -> AsyncIterator[Running]:
    doc = config_doc(broker.port, free_port(), state_dir=str(tmp_path / "state"))
    path = write_config(tmp_path, doc)
    async with simulated(path), recording(broker.port, "m2m/start/a/v") as rec:
        with Daemon(path) as daemon:
            daemon.start()
            await rec.wait_for(lambda: len(rec.payloads("m2m/start/a/v")) >= 3)
            yield Running(doc, path, daemon, rec)


async def test_a_slow_reload_never_stalls_polling(running: Running) -> None:
    """A config that takes seconds to read (here: a large one, refused at the end) is read off
    the event loop: readings keep their 100 ms pace all through the reload."""
    path, daemon = running.path, running.daemon
    # Seconds of YAML parsing, then an unknown key: the old config keeps running.
    padding = ", ".join(["0"] * 150_000)
    path.write_text(path.read_text() + f"padding: [{padding}]\n")
    started = time.time()
    daemon.signal(signal.SIGHUP)
    await until(lambda: daemon.running() and "reload refused" in daemon.output(),
                timeout=120, what="the large config to be refused")
    ended = time.time()
    assert ended - started > 1.0, "the config read too fast to show a stall; enlarge it"
    stamps = [json.loads(p)["ts"] / 1000 for p in running.readings()]
    inside = [t for t in stamps if started <= t <= ended]
    # A loop stalled by the read polls nothing inside the window; 100 ms polls do.
    edges = [started, *inside, ended]
    longest = max(b - a for a, b in itertools.pairwise(edges))
    took = ended - started
    assert longest < 1.0, f"no reading for {longest:.1f} s in a {took:.1f} s reload"
    assert "unknown key 'padding'" in daemon.output()


async def test_a_reload_naming_a_fifo_secret_is_refused_and_polling_goes_on(
    tmp_path: Path, running: Running
) -> None:
    """SIGHUP with `password: ${file:FIFO}`: refused at once (it blocked the whole daemon until
    something wrote the FIFO), the old config keeps running, readings keep coming."""
    fifo = tmp_path / "pw"
    os.mkfifo(fifo)
    running.doc["mqtt"]["password"] = f"${{file:{fifo}}}"
    write_config(tmp_path, running.doc)
    running.daemon.signal(signal.SIGHUP)
    await until(lambda: running.daemon.running() and "reload refused" in running.daemon.output(),
                what="the reload to be refused")
    assert "not a regular file" in running.daemon.output()
    seen = len(running.readings())
    await running.rec.wait_for(lambda: len(running.readings()) >= seen + 5)
