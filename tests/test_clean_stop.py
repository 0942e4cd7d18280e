"""A clean stop (SIGTERM) leaves every retained status `offline`: the daemon as a subprocess,
a real mosquitto, a pymodbus device."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from tests.helpers import Broker, Daemon, free_port, recording, simulated
from tests.test_e2e import write_config

pytestmark = pytest.mark.integration  # starts processes or socket servers

PREFIX = "m2m/e2e"


async def test_sigterm_sets_every_device_and_the_gateway_offline(
    tmp_path: Path, broker: Broker
) -> None:
    """Statuses describe now: after a stop no device stays retained `online`."""
    config = write_config(
        tmp_path / "bridge.yaml", broker.port, free_port(), [{"name": "level", "address": 0}],
        extra_devices=[{"name": "dev2", "link": "plc", "unit": 2, "interval": "200ms",
                        "points": [{"name": "level", "address": 0}]}],
    )
    statuses = [f"{PREFIX}/status", f"{PREFIX}/dev/status", f"{PREFIX}/dev2/status"]
    async with simulated(config):
        with Daemon(config) as daemon:
            async with recording(broker.port, f"{PREFIX}/#") as live:
                daemon.start()
                await live.wait_for(lambda: all(live.last(t) == b"online" for t in statuses))
                daemon.signal(signal.SIGTERM)
                assert await asyncio.to_thread(daemon.wait, 30) == 0
                await live.wait_for(lambda: live.last(statuses[0]) == b"offline")
            # A device's `offline` is the last word about it, the gateway's the last of all.
            topics = [t for t, _, _ in live.messages]
            assert topics[-1] == statuses[0]
            for device in ("dev", "dev2"):
                about = [t for t in topics if t.startswith(f"{PREFIX}/{device}/")]
                assert about[-1] == f"{PREFIX}/{device}/status", about[-5:]
            # A newcomer sees what is retained now.
            async with recording(broker.port, f"{PREFIX}/#") as later:
                await later.wait_for(lambda: all(later.last(t) == b"offline" for t in statuses))
                assert all(retained for t, _, retained in later.messages if t in statuses)
    assert "Traceback" not in daemon.output(), daemon.output()
