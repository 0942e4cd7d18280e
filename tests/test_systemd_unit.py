"""systemd/m2m-bridge.service: systemd accepts it, and it is confined as DESIGN.md says.

`systemd-analyze verify` checks that the ExecStart binary exists, so it runs on a copy whose
ExecStart points at this checkout's venv; everything else (User=, credentials, sandboxing) is
checked as shipped. systemd-analyze comes with Debian's `systemd` package (scripts/setup
installs it); the tests skip only when it is absent.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

UNIT = ROOT / "systemd" / "m2m-bridge.service"
INSTALLED_EXEC = "/opt/m2m-bridge/.venv/bin/m2m-bridge"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze not installed (Debian package systemd; scripts/setup)"
)


def directives(text: str) -> dict[str, list[str]]:
    """Every `Key=value` of the unit, in order; a key may repeat (DeviceAllow=)."""
    found: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        found.setdefault(key.strip(), []).append(value.strip())
    return found


@pytest.fixture
def local_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart at this checkout's m2m-bridge, named as shipped."""
    exe = Path(sys.executable).parent / "m2m-bridge"
    if not exe.exists():
        pytest.fail(f"{exe} missing: install the package (scripts/setup)")
    text = UNIT.read_text()
    assert INSTALLED_EXEC in text
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace(INSTALLED_EXEC, str(exe)))
    return copy


@pytest.mark.integration
@needs_analyze
def test_systemd_analyze_verify_passes_without_warnings(local_unit: Path) -> None:
    assert ANALYZE is not None
    result = subprocess.run(
        [ANALYZE, "verify", str(local_unit)], capture_output=True, text=True, timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # Unknown directives are only warnings ("Unknown key ..., ignoring"), so look for them.
    about_unit = [line for line in output.splitlines() if local_unit.name in line]
    assert not about_unit, output
    assert not re.search(r"Unknown (key|section)|ignoring|Invalid|Failed to parse", output), output


@pytest.mark.integration
@needs_analyze
def test_security_exposure_is_low(local_unit: Path) -> None:
    """`systemd-analyze security` (offline) rates the sandbox; keep it at 2.0 or better."""
    assert ANALYZE is not None
    result = subprocess.run(
        [ANALYZE, "security", "--offline=true", "--no-pager", str(local_unit)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0, result.stdout


def test_unit_has_every_confinement_design_md_asks_for() -> None:
    unit = directives(UNIT.read_text())

    def one(key: str) -> str:
        assert key in unit, f"{key}= missing"
        assert len(unit[key]) == 1, f"{key}= set more than once"
        return unit[key][0]

    assert one("Type") == "notify"
    assert one("ExecStart") == f"{INSTALLED_EXEC} run -c /etc/m2m-bridge/bridge.yaml"
    assert one("ExecReload") == "/bin/sh -c 'kill -HUP $MAINPID'"  # no procps needed
    assert one("User") == "m2m-bridge"
    assert one("SupplementaryGroups") == "dialout"
    assert one("StateDirectory") == "m2m-bridge"
    assert one("ConfigurationDirectory") == "m2m-bridge"
    assert one("LoadCredential") == "mqtt_password:/etc/m2m-bridge/mqtt_password"
    assert one("ProtectSystem") == "strict"
    assert one("CapabilityBoundingSet") == ""
    assert one("AmbientCapabilities") == ""
    assert one("DevicePolicy") == "closed"
    assert sorted(unit["DeviceAllow"]) == sorted(
        f"char-{name} rw" for name in ("ttyUSB", "ttyACM", "ttyS", "ttyAMA")
    )
    assert "PrivateDevices" not in unit  # it would hide the serial adapters
    assert "PrivateUsers" not in unit  # dialout would not be mapped
    assert set(one("RestrictAddressFamilies").split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert unit["SystemCallFilter"][0] == "@system-service"
    assert set(unit["SystemCallFilter"][1].removeprefix("~").split()) >= {"@privileged"}
    assert one("SystemCallArchitectures") == "native"
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "ProtectKernelTunables",
                "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups",
                "RestrictNamespaces", "LockPersonality", "MemoryDenyWriteExecute",
                "RestrictRealtime", "RestrictSUIDSGID"):
        assert one(key) == "yes", key
    assert one("UMask") == "0077"
    assert one("Restart") == "on-failure"
    assert one("RestartPreventExitStatus") == "78"  # the CLI's config-error exit code
    assert one("TimeoutStopSec") == "20"
    assert one("WatchdogSec") == "30"


def test_config_error_exit_code_matches_restart_prevention() -> None:
    """RestartPreventExitStatus only helps if `run` really exits 78 on a config error."""
    from bridge import cli

    prevented = int(directives(UNIT.read_text())["RestartPreventExitStatus"][0])
    assert prevented == cli.EXIT_CONFIG
