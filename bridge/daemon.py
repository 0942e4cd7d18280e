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
import contextlib
import ctypes
import gc
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar, cast

import structlog

from bridge.config.apart import load_config_apart
from bridge.errors import BridgeError, ConfigError
from bridge.health import Activity
from bridge.logs import redact_secrets
from bridge.service import Service
from bridge.systemd import notify, watchdog, watchdog_interval

log = structlog.get_logger("bridge.daemon")
T = TypeVar("T")

EXIT_FORCED = 1
RELOAD_DEADLINE = 60.0  # seconds to read and check a new config before giving up on it
STOP_GRACE = 10.0  # seconds to flush the buffer on stop; systemd's TimeoutStopSec is 20


async def run_daemon(config_path: Path, service: Service) -> None:
    """Run `service` (built from `config_path`) until a stop signal: startup, main loop,
    shutdown, with the signal handlers in place only while it runs."""
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

    reloads = asyncio.Lock()  # one at a time, in the order the SIGHUPs came
    reloading: set[asyncio.Task[None]] = set()

    def on_reload() -> None:
        task = asyncio.get_running_loop().create_task(
            _serialised(reloads, reload(config_path, service))
        )
        reloading.add(task)
        task.add_done_callback(reloading.discard)

    handlers = {signal.SIGTERM: on_stop, signal.SIGINT: on_stop, signal.SIGHUP: on_reload}
    with _captured(handlers):
        metrics = await _startup(service)
        try:
            await _main_loop(service, stop)
        finally:
            if metrics is not None:
                metrics.close()


@contextlib.contextmanager
def _captured(handlers: dict[signal.Signals, Callable[[], None]]) -> Iterator[None]:
    """The loop handles `handlers`' signals inside the block; the defaults come back after."""
    loop = asyncio.get_running_loop()
    for sig, handler in handlers.items():
        loop.add_signal_handler(sig, handler)
    try:
        yield
    finally:
        for sig in handlers:
            loop.remove_signal_handler(sig)


async def _startup(service: Service) -> asyncio.Server | None:
    """Bind the metrics port (a failure is exit 1, before anything polls) and say what in the
    config looks suspicious."""
    metrics = None
    settings = service.config.metrics
    if settings is not None:
        # Only with `metrics:` configured: prometheus_client is ~1.5 MiB of RSS (bench/rss.py).
        from bridge.metrics import serve_metrics  # noqa: PLC0415 - see above

        try:
            metrics = await serve_metrics(service, settings.host, settings.port)
        except OSError as exc:
            where = f"{settings.host}:{settings.port}"
            raise BridgeError(f"metrics on {where}: {exc.strerror}") from None
        log.info("metrics served", url=f"http://{settings.host}:{settings.port}/metrics")
    for warning in service.config.warnings:
        log.warning("config warning", issue=str(warning))
    give_back_memory()
    return metrics


def give_back_memory() -> None:
    """Return to the OS what reading the config freed: the YAML nodes and the validated copies
    peak far above what the models keep (bench/rss.py: 3 MiB of RSS at 500 devices x 30
    points, 0.3 MiB at 10 x 100). glibc keeps freed heap pages; `malloc_trim(0)` hands them
    back. Elsewhere (musl) there is no such call and nothing is done."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


async def _main_loop(service: Service, stop: asyncio.Event) -> None:
    """The service until `stop`, with watchdog pings beside it when systemd asks for them."""

    def ready() -> None:
        notify("READY=1")

    interval = watchdog_interval()
    async with asyncio.TaskGroup() as tg:
        if interval is not None:
            pinging = tg.create_task(watchdog(lambda: _activities(service), interval))
        await service.run(stop=stop, ready=ready, grace=STOP_GRACE)
        if interval is not None:
            pinging.cancel()


async def _serialised(lock: asyncio.Lock, work: Coroutine[Any, Any, None]) -> None:
    async with lock:
        await work


async def reload(config_path: Path, service: Service) -> None:
    """Load `config_path` again and apply it; on any error keep what runs and say why.

    Reading and checking the file happens off the event loop (a slow disk or a 50 MB file
    must not stop polling, publishing, metrics or watchdog pings); applying it happens on it.
    """
    notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
    try:
        # No state_dir check: a new state_dir only applies at a restart, and a full state disk
        # (which the buffer rides out) must not refuse a reload.
        async with asyncio.timeout(RELOAD_DEADLINE):  # keeps a stop's cancel, unlike wait_for
            new = await _off_loop(lambda: load_config_apart(config_path))
        for warning in new.warnings:
            log.warning("config warning", issue=str(warning))
        # Connections made with the old values may still fail and say so: keep both.
        redact_secrets(service.config.secrets | new.secrets)
        changes = service.reload(new)
    except ConfigError as exc:
        for issue in exc.issues:
            log.error("reload refused: config error", issue=str(issue))
        log.warning("reload refused; the running config stays", errors=len(exc.issues))
    except BridgeError as exc:
        log.error("reload refused; the running config stays", error=str(exc))
    except TimeoutError:
        # The thread reads on and its result is dropped; files are bounded, so it ends.
        why = f"reading the config took longer than {RELOAD_DEADLINE:g} s"
        log.error("reload refused; the running config stays", error=why)
    else:
        log.info("reloaded", changes=changes or ["nothing changed"])
        give_back_memory()  # the new file's peak, as at startup
    finally:
        notify("READY=1")


async def _off_loop(work: Callable[[], T]) -> T:
    """Run `work` in a daemon thread: unlike asyncio.to_thread's executor, a load still
    running when the daemon stops does not hold up its exit."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if done.cancelled():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(cast(T, result))

    def run() -> None:
        try:
            result, error = work(), None
        except BaseException as exc:  # handed to the awaiting task, which decides
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits any more
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="config-reload", daemon=True).start()
    return await done


def _activities(service: Service) -> Iterator[Activity]:
    yield service.publisher.activity
    for poller in service.pollers.values():
        yield poller.activity
