"""`m2m-bridge simulate` as a process: SIGTERM is a clean stop that leaves nothing behind."""

from __future__ import annotations

import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, free_port

pytestmark = pytest.mark.integration  # starts processes or socket servers

CONFIG = """\
version: 1
gateway: {{id: sim}}
mqtt: {{host: 127.0.0.1, port: 1}}
links:
  - {{name: plc, type: tcp, host: 127.0.0.1, port: {port}}}
  - {{name: bus, type: rtu, port: /dev/null, baudrate: 19200}}
devices:
  - {{name: plc-1, link: plc, points: [{{name: level, address: 0}}]}}
  - {{name: rtu-1, link: bus, points: [{{name: level, address: 0}}]}}
"""


def simulate(
    tmp_path: Path, port: int, text: str | None = None
) -> tuple[subprocess.Popen[str], Path]:
    """`simulate` with its own TMPDIR, so its m2m-sim-* directory is ours to look for; the
    config `text`, else CONFIG on `port`."""
    config = tmp_path / "bridge.yaml"
    config.write_text(CONFIG.format(port=port) if text is None else text)
    temp = tmp_path / "tmp"
    temp.mkdir()
    process = subprocess.Popen(
        [sys.executable, "-m", "bridge", "simulate", "-c", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "TMPDIR": str(temp)},
    )
    return process, temp


def read_line(process: subprocess.Popen[str], timeout: float = 30.0) -> str:
    """The next stdout line, or fail after `timeout` s (a hung simulator must not hang us)."""
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while not selector.select(max(0.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                process.kill()
                raise AssertionError(f"no output within {timeout}s: {process.communicate()}")
    return process.stdout.readline()


def leftovers(temp: Path) -> list[str]:
    # lexists: a dangling pty symlink passes `not exists()`.
    return [name for name in os.listdir(temp) if os.path.lexists(temp / name)]


def test_sigterm_exits_0_and_removes_the_temp_directory(tmp_path: Path) -> None:
    """The pty link and its m2m-sim-* directory are gone after SIGTERM, and the exit is 0."""
    process, temp = simulate(tmp_path, free_port())
    try:
        line = read_line(process)
        assert line.startswith("rtu link bus: connect to "), line
        link = Path(line.split("connect to ", 1)[1].strip())
        assert link.parent.name.startswith("m2m-sim-")
        assert link.parent.parent == temp
        assert os.path.lexists(link)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=30)
        assert process.returncode == 0, err
        assert "Traceback" not in err
        assert not os.path.lexists(link)
        assert leftovers(temp) == []
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def test_a_port_in_use_fails_in_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    """A start that fails (the tcp port is taken) still removes the pty directory."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        process, temp = simulate(tmp_path, taken.getsockname()[1])
        try:
            _, err = process.communicate(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
    assert process.returncode == 1, err
    assert "already in use" in err
    assert "Traceback" not in err
    assert leftovers(temp) == []


def test_sigterm_while_a_hundred_devices_are_built_still_leaves_nothing(
    tmp_path: Path,
) -> None:
    """100 devices take seconds to build (pymodbus makes each one's tables in Python): a
    SIGTERM then ends the run once they are built, exit 0, nothing left in TMPDIR."""
    port = free_port()
    devices = "\n".join(
        f"  - {{name: d{unit}, link: plc, unit: {unit}, points: [{{name: v, address: 0}}]}}"
        for unit in range(1, 101)
    )
    process, temp = simulate(tmp_path, port, (
        "version: 1\ngateway: {id: sim}\nmqtt: {host: 127.0.0.1, port: 1}\n"
        f"links:\n  - {{name: plc, type: tcp, host: 127.0.0.1, port: {port}}}\n"
        f"devices:\n{devices}\n"
    ))
    try:
        deadline = time.monotonic() + 30
        while not any(name.startswith("m2m-sim-") for name in os.listdir(temp)):
            assert time.monotonic() < deadline, "no m2m-sim-* directory within 30 s"
            assert process.poll() is None, process.communicate()
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)  # while the devices are being built
        _, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        assert "Traceback" not in err
        assert leftovers(temp) == []
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
