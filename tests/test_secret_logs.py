"""Secret values used inside other settings (a host, a port, a CA file from ${env:…}) never
reach the daemon's log, whatever message carries them: device offline, broker unreachable,
a TLS error. The daemon runs as a subprocess, as systemd would run it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from bridge.logs import redact, redact_secrets
from tests.helpers import Daemon, free_port, run_cli, until

MARK = "ZZ9q"


def config_doc(tmp_path: Path) -> dict[str, Any]:
    return {
        "version": 1,
        "gateway": {"id": "red", "state_dir": str(tmp_path / "state")},
        "mqtt": {"host": "${env:BROKER_HOST}", "port": "${env:BROKER_PORT}",
                 "tls": {"ca_file": "${env:CA_FILE}"}},
        "links": [{"name": "plc", "type": "tcp", "host": "${env:DEVICE_HOST}",
                   "port": "${env:DEVICE_PORT}", "timeout": "200ms"}],
        "devices": [{"name": "a", "link": "plc", "interval": "100ms", "offline_after": 1,
                     "points": [{"name": "v", "address": 0}]}],
    }


@pytest.mark.integration
async def test_secrets_inside_hosts_ports_and_tls_files_never_reach_the_log(
    tmp_path: Path,
) -> None:
    """Nothing listens on either port and the CA file is not a certificate: the daemon says
    so in its usual lines, each with <secret> where the values were."""
    ca = tmp_path / f"ca-{MARK}.pem"
    ca.write_text("not a certificate\n")
    broker_port, device_port = str(free_port()), str(free_port())
    env = {"BROKER_HOST": "localhost", "BROKER_PORT": broker_port, "CA_FILE": str(ca),
           "DEVICE_HOST": "localhost", "DEVICE_PORT": device_port}
    path = tmp_path / "bridge.yaml"
    path.write_text(yaml.safe_dump(config_doc(tmp_path)))
    daemon = Daemon(path, log_level="debug")
    daemon.start(env=env)
    try:
        def told() -> bool:
            daemon.running()
            events = {e["event"] for e in daemon.events()}
            return "device offline" in events and any("broker" in e for e in events)

        await until(told, what=lambda: f"device offline and a broker error:\n{daemon.output()}")
    finally:
        daemon.stop()
    output = daemon.output()
    for value in (MARK, broker_port, device_port, str(ca)):
        assert value not in output, f"{value!r} leaked:\n{output}"
    assert "<secret>" in output


@pytest.mark.integration
def test_one_off_read_errors_never_show_secrets(tmp_path: Path) -> None:
    """`read -c` against a device whose port is a secret: the one-line error redacts it."""
    device_port = str(free_port())
    path = tmp_path / "bridge.yaml"
    doc = config_doc(tmp_path)
    doc["mqtt"] = {"host": "127.0.0.1"}
    path.write_text(yaml.safe_dump(doc))
    result = run_cli("read", "-c", str(path), "a", env={"DEVICE_HOST": "localhost",
                                                        "DEVICE_PORT": device_port})
    assert result.returncode == 1, result.stderr
    assert "connection failed" in result.stderr
    assert device_port not in result.stderr
    assert "tcp://<secret>:<secret>" in result.stderr


def test_short_secrets_are_redacted_only_as_whole_values() -> None:
    """A QoS "1" from ${env:…} must not garble every 1 in the logs; long values go anywhere."""
    try:
        redact_secrets({"1", "s3cret-host"})
        assert redact("1") == "<secret>"
        assert redact("poll 1 of 10") == "poll 1 of 10"
        assert redact("tcp://s3cret-host:502 refused") == "tcp://<secret>:502 refused"
    finally:
        redact_secrets(())
