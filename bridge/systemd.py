"""systemd notify protocol (sd_notify(3)): a datagram to $NOTIFY_SOCKET, no library needed.

The protocol is one `sendto` of `KEY=VALUE` lines; python-systemd would add a C dependency for
that. Without $NOTIFY_SOCKET (not under systemd) every call is a no-op.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Iterable, Mapping

import structlog

from bridge.health import Activity

log = structlog.get_logger("bridge.systemd")


def notify(state: str) -> bool:
    """Send `state` (e.g. "READY=1") to systemd; return whether it was sent."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):  # abstract namespace socket
        path = "\0" + path[1:]
    try:  # out of sockets or a vanished systemd: a missed notification, never a crash
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(state.encode(), path)
    except OSError:
        return False
    return True


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec=), or None when not asked for."""
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(0.01, int(usec) / 2_000_000)
    except ValueError:
        return None


async def watchdog(activities: Callable[[], Iterable[Activity]], interval: float) -> None:
    """Ping systemd every `interval` seconds while no loop is stuck; stop pinging when one is.

    systemd then kills and restarts the service after WatchdogSec=, which is the point: a hung
    poller or publisher is not something the daemon can be trusted to notice from inside.
    """
    stuck_before: set[str] = set()
    while True:
        stuck = {a.name for a in activities() if a.stuck()}
        if not stuck:
            notify("WATCHDOG=1")
        elif stuck != stuck_before:
            log.error("watchdog: loop stuck, withholding pings", stuck=sorted(stuck))
        stuck_before = stuck
        await asyncio.sleep(interval)
