"""Session checks: the suite leaves nothing behind.

Nothing new in the checkout (a Service run with a relative state_dir once left
./state/buffer.sqlite3 there), and no simulator directory (`m2m-sim-*`, made with mkdtemp) left
in the temp directory. The session runs with its own TMPDIR (for the tests and every process
they start), so runs of the suite side by side on one machine never see each other's
directories; that directory is removed at the end.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, settings

from tests.helpers import ROOT, VOLTAGE, Broker, Daemons, free_port, mosquitto, simulated

# Property tests are judged by their examples, not by how fast a shared machine runs them:
# no per-example deadline, no "too slow" health check (tests may still set their own).
settings.register_profile("m2m", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("m2m")


def pytest_configure(config: pytest.Config) -> None:
    """The fast tier (`-m "not integration"`) runs property tests with a third of their
    examples (tests.helpers.examples), so it stays a quick check; the full suite, which CI
    runs, keeps every example. Set M2M_EXAMPLES_SCALE=1 to run the fast tier in full."""
    if config.getoption("markexpr") == "not integration":
        os.environ.setdefault("M2M_EXAMPLES_SCALE", "0.33")

# What tools and Python write by themselves in the checkout (never a test's leftover).
CACHES = {".venv", "__pycache__", ".pytest_cache", ".hypothesis", ".mypy_cache", ".ruff_cache"}
# New untracked files of these kinds are someone's work in progress, not a test's output.
SOURCES = {".py", ".md", ".yaml", ".yml", ".toml", ".json", ".txt", ".sh", ".service", ".cfg"}


def _is_cache(path: str) -> bool:
    parts = Path(path).parts
    return any(p in CACHES or p.endswith(".egg-info") for p in parts)


def checkout_files() -> dict[str, int]:
    """Every file git does not track in the checkout (ignored ones included), with its mtime;
    caches and new source files are left out."""
    status = subprocess.run(
        ["git", "status", "--porcelain", "--ignored", "-z"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout
    found: dict[str, int] = {}
    for entry in filter(None, status.split("\0")):
        code, path = entry[:2], entry[3:]
        if code not in ("??", "!!") or _is_cache(path):
            continue
        top = ROOT / path
        files = [top] if not top.is_dir() else [p for p in top.rglob("*") if not p.is_dir()]
        for file in files:
            rel = str(file.relative_to(ROOT))
            if _is_cache(rel) or (code == "??" and file.suffix in SOURCES):
                continue
            try:
                found[rel] = file.lstat().st_mtime_ns
            except OSError:
                continue  # gone meanwhile
    return found


def sim_dirs(tmp: Path) -> list[str]:
    # lexists: a dangling pty symlink left by a killed simulator is a leftover too.
    return sorted(p.name for p in tmp.glob("m2m-sim-*") if os.path.lexists(p))


@pytest.fixture(scope="session", autouse=True)
def leaves_nothing_behind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    # Inside pytest's own (numbered, pruned) base directory, so even a killed run leaves
    # nothing in /tmp itself; tmp_path stays where it was.
    private = tmp_path_factory.getbasetemp() / "tmpdir"
    private.mkdir()
    saved_env, saved_tempdir = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"] = str(private)  # the simulators the tests start, in and out of process
    tempfile.tempdir = str(private)
    before = checkout_files()
    try:
        yield
    finally:
        if saved_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved_env
        tempfile.tempdir = saved_tempdir
        leftovers = sim_dirs(private)
        shutil.rmtree(private, ignore_errors=True)
    after = checkout_files()
    changed = sorted(p for p, mtime in after.items() if before.get(p) != mtime)
    problems = []
    if changed:
        problems.append(f"the tests left files in the checkout {ROOT}: {changed}")
    if leftovers:
        problems.append(f"the tests left simulator directories in the temp dir: {leftovers}")
    if problems:
        pytest.fail("; ".join(problems), pytrace=False)


class UnmarkedIntegrationError(RuntimeError):
    """A test outside the integration mark started a process or a server."""


@pytest.fixture(autouse=True)
def fast_tier_starts_nothing(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keep `pytest -m "not integration"` honest: a test without the mark that starts a
    process, listens on a socket or opens a pty fails, saying to mark it."""
    if request.node.get_closest_marker("integration") is not None:
        return

    def refuse(what: str) -> Any:
        def refused(*_args: object, **_kwargs: object) -> None:
            raise UnmarkedIntegrationError(
                f"{request.node.nodeid} {what}: mark it @pytest.mark.integration"
            )

        return refused

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse("starts a process"))
    monkeypatch.setattr(socket.socket, "listen", refuse("listens on a socket"))
    monkeypatch.setattr(os, "openpty", refuse("opens a pty"))


# --- the real parts integration tests share (tests/helpers.py has the rest) -------------------


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A plain mosquitto for the test; a module that needs another (TLS, passwords, more
    logging) defines its own `broker`."""
    with mosquitto(tmp_path) as b:
        yield b


@pytest.fixture
def daemons() -> Iterator[Daemons]:
    """Start daemons with `daemons.start(config)`; those still running are killed after."""
    started = Daemons()
    yield started
    started.stop()


@pytest.fixture
async def voltage_device(tmp_path: Path) -> AsyncIterator[int]:
    """A simulated meter, unit 1, whose input registers 0-1 hold VOLTAGE (float32, point
    `voltage`); yields its port on 127.0.0.1."""
    port = free_port()
    path = tmp_path / "device.yaml"
    path.write_text(yaml.safe_dump({
        "version": 1,
        "links": [{"name": "plc", "type": "tcp", "host": "127.0.0.1", "port": port}],
        "devices": [{"name": "dev", "link": "plc", "points": [
            {"name": "voltage", "table": "input", "address": 0, "type": "float32"}]}],
    }))
    async with simulated(path, {"dev": {"voltage": VOLTAGE}}):
        yield port
