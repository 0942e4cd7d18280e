"""`m2m-bridge run`: the daemon's lifecycle around a Service (uvicorn's shape).

Startup, main loop and shutdown are separate steps. Signals: SIGTERM/SIGINT stop (poll no
more, flush for a bounded time, publish `offline`, exit 0) and a second one exits at once;
SIGHUP reloads the config file by difference, and a bad new config is logged while the old
one keeps running. systemd hears READY=1 once started (without waiting for the broker: a
gateway must poll and buffer with the uplink down), RELOADING=1/READY=1 around a reload,
STOPPING=1 on the way out, and WATCHDOG=1 only while no loop is stuck.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import structlog

from bridge.config import load_config
from bridge.errors import BridgeError, ConfigError
from bridge.health import Activity
from bridge.metrics import serve_metrics
from bridge.service import Service
from bridge.systemd import notify, watchdog, watchdog_interval

log = structlog.get_logger("bridge.daemon")

EXIT_FORCED = 1
STOP_GRACE = 10.0  # seconds to flush the buffer on stop; systemd's TimeoutStopSec is 20


async def run_daemon(config_path: Path, service: Service) -> None:
    """Run `service` (built from `config_path`) until a stop signal."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = 0

    def on_stop() -> None:
        nonlocal signals
        signals += 1
        if signals > 1:  # a second signal means now
            sys.stderr.write("m2m-bridge: second signal, exiting at once\n")
            sys.stderr.flush()
            os._exit(EXIT_FORCED)
        notify("STOPPING=1")
        log.info("stopping", signal="TERM/INT")
        stop.set()

    def on_reload() -> None:
        reload(config_path, service)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop)
    loop.add_signal_handler(signal.SIGHUP, on_reload)

    def ready() -> None:
        notify("READY=1")

    settings = service.config.metrics
    if settings is not None:
        try:
            metrics = await serve_metrics(service, settings.host, settings.port)
        except OSError as exc:
            where = f"{settings.host}:{settings.port}"
            raise BridgeError(f"metrics on {where}: {exc.strerror}") from None
        log.info("metrics served", url=f"http://{settings.host}:{settings.port}/metrics")

    interval = watchdog_interval()
    async with asyncio.TaskGroup() as tg:
        if interval is not None:
            pinging = tg.create_task(watchdog(lambda: _activities(service), interval))
        await service.run(stop=stop, ready=ready, grace=STOP_GRACE)
        if interval is not None:
            pinging.cancel()
    if settings is not None:
        metrics.close()


def reload(config_path: Path, service: Service) -> None:
    """Load `config_path` again and apply it; on any error keep what runs and say why."""
    notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
    try:
        new = load_config(config_path)
        changes = service.reload(new)
    except ConfigError as exc:
        for issue in exc.issues:
            log.error("reload refused: config error", issue=str(issue))
        log.warning("reload refused; the running config stays", errors=len(exc.issues))
    except BridgeError as exc:
        log.error("reload refused; the running config stays", error=str(exc))
    else:
        log.info("reloaded", changes=changes or ["nothing changed"])
    finally:
        notify("READY=1")


def _activities(service: Service) -> Iterator[Activity]:
    yield service.publisher.activity
    for poller in service.pollers.values():
        yield poller.activity
