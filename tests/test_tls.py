"""TLS, client certificates, passwords and ACLs against a real mosquitto, the daemon as a
subprocess.

The test makes its own PKI with openssl (a CA, a server certificate for IP 127.0.0.1, a client
certificate, and an unrelated CA), and starts mosquitto with only a TLS listener that requires
client certificates, a password file and an ACL: the bridge's user may publish only under its
prefix and read only its `…/set` topics; an `admin` user reads everything (the test's eyes).
The password reaches the daemon as `${credential:mqtt_password}` through
$CREDENTIALS_DIRECTORY, as systemd's LoadCredential= provides it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import yaml

from tests.helpers import (
    VOLTAGE,
    Broker,
    Daemon,
    Daemons,
    Pki,
    Recorder,
    free_port,
    make_pki,
    metrics,
    mosquitto_tls,
    recording,
    until,
)

pytestmark = pytest.mark.integration  # starts processes or socket servers

GATEWAY = "tls"
PREFIX = f"m2m/{GATEWAY}"
BRIDGE_PASSWORD = "tls-Bridge-pw-7c1e93d0"
ADMIN_PASSWORD = "tls-Admin-pw-55aa01"
ACL = f"""\
user bridge
topic write {PREFIX}/#
topic read {PREFIX}/+/+/set

user admin
topic readwrite #
"""
POINTS = [{"name": "voltage", "table": "input", "address": 0, "type": "float32", "unit": "V"}]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def broker(tmp_path: Path, pki: Pki) -> Iterator[Broker]:
    users = {"bridge": BRIDGE_PASSWORD, "admin": ADMIN_PASSWORD}
    with mosquitto_tls(tmp_path, pki, users, ACL) as b:
        yield b


def client_tls(pki: Pki, ca: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca or pki.ca))
    context.load_cert_chain(pki.client_cert, pki.client_key)
    return context


def write_config(tmp: Path, broker: int, device: int, pki: Pki, *, metrics_port: int = 0,
                 **tls: Any) -> Path:
    path = tmp / "bridge.yaml"
    metrics = {"metrics": {"host": "127.0.0.1", "port": metrics_port}} if metrics_port else {}
    path.write_text(yaml.safe_dump({
        "version": 1,
        "gateway": {"id": GATEWAY, "state_dir": str(tmp / "state")},
        "mqtt": {
            "host": "127.0.0.1", "port": broker, "username": "bridge",
            "password": "${credential:mqtt_password}",
            "tls": {"ca_file": str(pki.ca), "cert_file": str(pki.client_cert),
                    "key_file": str(pki.client_key)} | tls,
        },
        "links": [{"name": "plc", "type": "tcp", "host": "127.0.0.1", "port": device,
                   "timeout": "300ms"}],
        "devices": [{"name": "dev", "link": "plc", "interval": "200ms", "points": POINTS}],
        **metrics,
    }, sort_keys=False))
    return path


def start_daemon(
    daemons: Daemons, config: Path, password: str, log_level: str = "debug"
) -> Daemon:
    """The daemon with its password in a credentials directory, as LoadCredential= does."""
    credentials = config.parent / "credentials"
    credentials.mkdir(exist_ok=True)
    secret = credentials / "mqtt_password"
    secret.write_text(password + "\n")
    secret.chmod(0o600)
    return daemons.start(config, {"CREDENTIALS_DIRECTORY": str(credentials)}, log_level)


@contextlib.asynccontextmanager
async def watching(broker: Broker, pki: Pki, topic: str = "#") -> AsyncIterator[Recorder]:
    """Record `topic` as the admin user (who may read everything)."""
    admin = aiomqtt.Client(
        "127.0.0.1", broker.port, username="admin", password=ADMIN_PASSWORD,
        tls_context=client_tls(pki), identifier=f"admin-{time.monotonic_ns()}",
    )
    async with recording(broker.port, topic, client=admin) as recorder:
        yield recorder


def log_events(d: Daemon) -> list[dict[str, Any]]:
    """The daemon's JSON log lines (anything else on stderr is kept as {"raw": line})."""
    events = []
    for line in d.output().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            events.append({"raw": line})
    return events


def only_failure(d: Daemon, events: list[dict[str, Any]]) -> dict[str, Any]:
    """The one warning or error the daemon logged: a failure is said once, not per attempt."""
    failures = [e for e in events if e.get("level") in ("warning", "error")]
    assert len(failures) == 1, d.output()
    return failures[0]


async def keeps_trying(d: Daemon, metrics_port: int, attempts: int, *events: str) -> None:
    """Wait until the daemon has failed to connect `attempts` times (its reconnect counter) and
    logged each of `events`, failing at once if it exits."""

    async def done() -> bool:
        d.running()
        logged = {e.get("event") for e in log_events(d)}
        if not set(events) <= logged:
            return False
        return (await metrics(metrics_port)).get("m2m_mqtt_reconnects_total", 0) >= attempts

    await until(done, what=lambda: f"{attempts} attempts and {events}; log:\n{d.output()}")


async def test_bridge_publishes_over_mutual_tls_with_a_credential_password(
    tmp_path: Path, broker: Broker, voltage_device: int, pki: Pki, daemons: Daemons
) -> None:
    config = write_config(tmp_path, broker.port, voltage_device, pki)
    async with watching(broker, pki) as rec:
        d = start_daemon(daemons, config, BRIDGE_PASSWORD)
        await rec.wait_for(lambda: len(rec.payloads(f"{PREFIX}/dev/voltage")) >= 2)
        body = json.loads(rec.payloads(f"{PREFIX}/dev/voltage")[-1])
        assert body["value"] == VOLTAGE
        assert body["unit"] == "V"
        assert rec.last(f"{PREFIX}/status") == b"online"
        assert rec.last(f"{PREFIX}/dev/status") == b"online"
    events = log_events(d)
    assert any(e.get("event") == "broker connected" for e in events), d.output()
    assert BRIDGE_PASSWORD not in d.output()


async def test_acl_confines_the_bridge_user_to_its_prefix(broker: Broker, pki: Pki) -> None:
    """The ACL the README recommends: the bridge's login cannot publish or read elsewhere."""
    async with watching(broker, pki) as rec, aiomqtt.Client(
        "127.0.0.1", broker.port, username="bridge", password=BRIDGE_PASSWORD,
        tls_context=client_tls(pki), identifier="bridge-acl-probe",
    ) as bridge:
        await bridge.subscribe("#", qos=1)  # may only ever hear its own …/set topics
        await bridge.publish("plant/valve/set", b"1", qos=1)  # outside its prefix: dropped
        await bridge.publish(f"{PREFIX}/dev/x", b"2", qos=1)  # inside: delivered
        await rec.wait_for(lambda: rec.payloads(f"{PREFIX}/dev/x"))
        # Negative check: published first on the same connection, a delivered valve command
        # would be here before dev/x (the broker keeps one client's messages in order).
        assert not rec.payloads("plant/valve/set")

        heard: list[str] = []
        got_set = asyncio.Event()

        async def listen() -> None:
            async for message in bridge.messages:
                heard.append(str(message.topic))
                if str(message.topic).endswith("/set"):
                    got_set.set()

        listening = asyncio.create_task(listen())
        async with aiomqtt.Client(
            "127.0.0.1", broker.port, username="admin", password=ADMIN_PASSWORD,
            tls_context=client_tls(pki), identifier="admin-sender",
        ) as admin:
            await admin.publish("other/thing", b"x", qos=1)
            await admin.publish(f"{PREFIX}/dev/x/state", b"x", qos=1)
            await admin.publish(f"{PREFIX}/dev/setpoint/set", b"42", qos=1)
        await asyncio.wait_for(got_set.wait(), 30)
        # Negative check: sent before the /set on the same connection, anything the ACL let
        # through would have been heard before it.
        listening.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listening
    assert heard == [f"{PREFIX}/dev/setpoint/set"]


async def test_wrong_ca_fails_cleanly_and_publishes_nothing(
    tmp_path: Path, broker: Broker, voltage_device: int, pki: Pki, daemons: Daemons
) -> None:
    """A CA that did not sign the broker's certificate: one line naming certificate
    verification, the daemon keeps running (and polling), nothing reaches the broker."""
    metrics_port = free_port()
    config = write_config(tmp_path, broker.port, voltage_device, pki, metrics_port=metrics_port,
                          ca_file=str(pki.other_ca))
    async with watching(broker, pki) as rec:
        d = start_daemon(daemons, config, BRIDGE_PASSWORD)
        # Several connection attempts (back-off from ~1 s), one line for all of them.
        await keeps_trying(d, metrics_port, 3, "broker certificate verification failed")
        assert not [t for t, _, _ in rec.messages if t.startswith(PREFIX)], rec.messages
    events = log_events(d)
    line = only_failure(d, events)
    assert line["event"] == "broker certificate verification failed", line
    assert "certificate verify failed" in line["error"], line
    assert "mqtt.tls.ca_file" in line["error"], line
    assert not any("raw" in e for e in events), d.output()  # no stray tracebacks


async def test_wrong_password_fails_cleanly_naming_authorization(
    tmp_path: Path, broker: Broker, voltage_device: int, pki: Pki, daemons: Daemons
) -> None:
    wrong = "not-the-Password-0b9d"
    metrics_port = free_port()
    config = write_config(tmp_path, broker.port, voltage_device, pki, metrics_port=metrics_port)
    async with watching(broker, pki) as rec:
        d = start_daemon(daemons, config, wrong)
        await keeps_trying(d, metrics_port, 3, "broker refused login")
        assert not [t for t, _, _ in rec.messages if t.startswith(PREFIX)], rec.messages
    line = only_failure(d, log_events(d))
    assert line["event"] == "broker refused login", line
    assert "not authorized" in line["error"].lower(), line
    output = d.output()
    assert wrong not in output
    assert BRIDGE_PASSWORD not in output


async def test_missing_ca_file_is_one_clear_line_and_the_daemon_keeps_polling(
    tmp_path: Path, broker: Broker, voltage_device: int, pki: Pki, daemons: Daemons
) -> None:
    """A CA file that is not there is a broker problem, not a crash: polling goes on."""
    missing = tmp_path / "no-such-ca.pem"
    metrics_port = free_port()
    config = write_config(tmp_path, broker.port, voltage_device, pki, metrics_port=metrics_port,
                          ca_file=str(missing))
    d = start_daemon(daemons, config, BRIDGE_PASSWORD)
    await keeps_trying(d, metrics_port, 2, "broker settings unusable", "device online")
    events = log_events(d)
    line = only_failure(d, events)
    assert line["event"] == "broker settings unusable", line
    assert str(missing) in line["error"]
    assert "No such file" in line["error"]
    assert any(e.get("event") == "device online" for e in events), d.output()
