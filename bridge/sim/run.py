"""`m2m-bridge simulate`: the configured devices served until SIGTERM, values evolving.

Modbus TCP devices by bridge.sim.tcp, serial links (rtu, ascii, line instruments) on ptys by
bridge.sim.serial; this module runs both, so neither needs the other's start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Iterator
from typing import Literal

from bridge.config import (
    Config,
    LineLink,
    SerialLink,
    library_path,
    load_library_map,
    unknown_map,
)
from bridge.errors import UsageError
from bridge.sim.serial import SerialSimulator
from bridge.sim.tcp import Simulator

DEFAULT_PORT = 5020  # not 502: serving that needs root, and a real gateway may hold it


def library_config(
    name: str, *, unit: int, host: str = "127.0.0.1", port: int = DEFAULT_PORT
) -> Config:
    """A config serving library map `name` as `unit` on a Modbus TCP endpoint (`simulate --map
    library:NAME`): no file to write, the map's manufacturer and model answer FC43/FC17."""
    if library_path(name) is None:
        raise UsageError(unknown_map(name))
    if not 1 <= unit <= 247:
        raise UsageError(f"--unit {unit}: a slave id is 1-247")
    device_map = load_library_map(name)
    order = device_map.byte_order or "ABCD"  # as the loader completes a device's points
    points = [p if p.byte_order else p.model_copy(update={"byte_order": order})
              for p in device_map.points]
    return Config.model_validate({
        "version": 1,
        "links": [{"name": "sim", "type": "tcp", "host": host, "port": port}],
        "devices": [{
            "name": name, "link": "sim", "unit": unit, "points": points,
            "description": device_map.description, "manufacturer": device_map.manufacturer,
            "model": device_map.model,
        }],
    })


async def run_simulator(
    config: Config,
    *,
    tick: float = 1.0,
    on_ready: Callable[[], None] | None = None,
    baud: int | Literal["config"] | None = None,
    turnaround: float = 0.0,
    announce: Callable[[str], None] | None = None,
) -> None:
    """Serve `config`'s devices until cancelled, evolving their values every `tick` seconds.

    Serial links (rtu, ascii, serial) are served on ptys (bridge.sim.serial), each announced
    with its path; `baud` paces them at that rate, or at each link's own with "config".
    """
    sim = Simulator(config)
    pace: int | Callable[[SerialLink | LineLink], int] | None = (
        (lambda link: link.baudrate) if baud == "config" else baud
    )
    stop = asyncio.Event()
    # SIGTERM is how scripts and service managers stop us: a clean return (exit 0) that
    # removes the ptys' temp directory, where the default action would leave it behind. Taken
    # before the directory is made: building hundreds of devices takes a while, and a stop
    # meanwhile ends the run once they are built.
    with _stop_on_sigterm(stop):
        serial = SerialSimulator(config, sim, baud=pace, turnaround=turnaround)
        try:
            await sim.start()
            serial.start()
            for text in serial.announcements():
                if announce is not None:
                    announce(text)
            if on_ready is not None and not stop.is_set():
                on_ready()
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), tick)
                    break
                sim.tick()
                serial.tick()
        finally:
            serial.stop()
            await sim.stop()


@contextlib.contextmanager
def _stop_on_sigterm(stop: asyncio.Event) -> Iterator[None]:
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGTERM, stop.set)
    except (RuntimeError, NotImplementedError, ValueError):
        yield  # not the main thread (tests): cancellation still stops us
        return
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
