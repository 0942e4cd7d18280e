"""`map: sunspec` devices at run time: their maps, cached in the state dir, and the walks that
make them.

The loader marks such a device and keeps its own points only (bridge.config.loader); here its
SunSpec model chain is walked over the device's link (bridge.transports.sunspec) and turned into
a map (bridge.core.sunspec, scale factors read live), which the service merges into the device
as loaded (`with_map`: the device's own points override and extend it by name, as with any
map) and applies through its reload by difference, so pollers, Home Assistant discovery and
Sparkplug births and aliases follow with no case of their own.

- Every map walked is cached, atomically, in `<state_dir>/sunspec/<device>.yaml` (a valid map
  file: it can be copied and used as `map: FILE`). A daemon that starts while the inverter
  sleeps (a gateway rebooting at night) polls the cached map at once: its points are known,
  the device goes `offline` as any silent device does, and it is back with its readings when
  it wakes. A cache names the unit and link it was walked from; one of another unit or link
  (the config changed) is not used.
- The chain is walked on every start and every reload (SIGHUP), cache or not: scale factors
  may change with a firmware update. A walk that gives the map already known changes nothing.
- A device without a map (no cache, walk failed) is not polled: its status goes `offline`
  after `offline_after` failed walks, and the walk is retried with the device's poll back-off
  until it succeeds, when the device is added as a reload adds one.
- Logs: one line when a device is mapped ("sunspec device mapped", with its models, points
  and what changed), one when its walk fails and again only when the cause changes ("sunspec
  mapping failed, retrying"), never one per attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from bridge.config.library import SUNSPEC
from bridge.core.backoff import backoff
from bridge.device import BACKOFF_CAP
from bridge.errors import BridgeError
from bridge.transports.links import endpoint_for, modbus_link

# ruff: noqa: PLC0415 - YAML, the map loader, pydantic's validation and the SunSpec definitions
# are imported where a `map: sunspec` device needs them: every daemon builds a SunSpecMaps, and
# one without such a device should not carry them (RSS, DESIGN.md "Performance model").
if TYPE_CHECKING:
    from bridge.config import Config, Device, DeviceMap
    from bridge.core.sunspec import Chain
    from bridge.transports.link import Link

log = structlog.get_logger("bridge.sunspec")

CACHE_DIR = "sunspec"  # under the state dir
MAX_CACHE_BYTES = 4 << 20  # a chain of 256 models of 125 points is far below this


def is_sunspec(device: Device) -> bool:
    return device.map == SUNSPEC


def cache_path(state_dir: str | Path, device: str) -> Path:
    return Path(state_dir) / CACHE_DIR / f"{device}.yaml"


def walked_from(config: Config, device: Device) -> str:
    """Which device a map was walked from: its unit on its link's endpoint. A cache's
    `source` starts with this; a cache of another unit or link is not this device's."""
    link = modbus_link(config, device)
    where = str(endpoint_for(link)) if link is not None else device.link
    return f"SunSpec model chain of unit {device.unit} on {where}"


def chain_map(chain: Chain, origin: str) -> DeviceMap:
    """The map of a walked chain; its `source` says where and from what it was made (no
    time: two walks of an unchanged device give equal maps)."""
    from bridge.core.sunspec import definitions_version

    ids = ", ".join(str(m.id) for m in chain.models)
    return chain.device_map(source=f"{origin} (base {chain.base}, models {ids}), walked by "
                                   f"the daemon; model definitions: {definitions_version()}")


def read_cache(path: Path, origin: str) -> DeviceMap | str | None:
    """The map cached at `path` if it was walked from `origin`; None if there is none; why it
    cannot be used, if it is unreadable or another device's (the config moved it)."""
    import yaml
    from pydantic import ValidationError

    from bridge.config.model import DeviceMap

    try:
        with path.open("rb") as file:
            data = file.read(MAX_CACHE_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    if len(data) > MAX_CACHE_BYTES:
        return f"larger than {MAX_CACHE_BYTES} bytes"
    try:
        cached = DeviceMap.model_validate(yaml.safe_load(data))
    except (yaml.YAMLError, ValidationError, UnicodeDecodeError) as exc:
        return f"not a map: {str(exc).splitlines()[0]}"
    if not (cached.source or "").startswith(f"{origin} "):
        return f"not walked from this device (the {origin})"
    return cached


def write_cache(path: Path, device_map: DeviceMap, device: str) -> None:
    """Write `device_map` to `path` atomically: a crash leaves the old cache or the new one,
    never half of one. Raises OSError."""
    import yaml

    header = (
        f"# The SunSpec map of device {device} (map: sunspec), written by m2m-bridge each time\n"
        "# its model chain is walked; polled from here when the daemon starts while the\n"
        "# device does not answer. Scale factors are read with every poll. A copy works as a\n"
        "# map file (map: FILE); this one is rewritten, so edit the config, not this file.\n"
    )
    text = header + yaml.safe_dump(device_map.model_dump(mode="python", exclude_defaults=True),
                                   sort_keys=False, allow_unicode=True, width=100)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        with temporary.open("w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        temporary.replace(path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()


class SunSpecMaps:
    """The maps of a config's `map: sunspec` devices (by device name), kept across reloads for
    devices walked from the same unit and link, and the walks that refresh them."""

    def __init__(self) -> None:
        self.maps: dict[str, DeviceMap] = {}
        self._origins: dict[str, str] = {}  # what each map was walked from
        self._read: set[tuple[str, str]] = set()  # caches looked at: (device, origin)

    def update(self, config: Config) -> None:
        """Keep the maps of `config`'s SunSpec devices still on the same unit and link; forget
        the others (their cache is read again by their walk, and not used if it is stale)."""
        origins = {d.name: walked_from(config, d) for d in config.devices if is_sunspec(d)}
        for name in list(self.maps):
            if origins.get(name) != self._origins.get(name):
                del self.maps[name]
        self._origins = origins

    def read_caches(self, config: Config) -> None:
        """At start-up, before anything polls: the cached map of every SunSpec device that has
        one, so its points are polled (and announced) from the first moment."""
        self.update(config)
        for device in config.devices:
            if is_sunspec(device) and device.name not in self.maps:
                cached = self._cached(config, device)
                if cached is not None:
                    self.maps[device.name] = cached

    def effective(self, config: Config) -> Config:
        """`config` as it runs: each SunSpec device with its map merged in, or left out while
        it has none (nothing is known to poll)."""
        if not self.maps and not any(is_sunspec(d) for d in config.devices):
            return config
        from bridge.config.apart import freeze
        from bridge.config.frozen import Frozen
        from bridge.config.loader import with_map

        def merged(device: Device) -> Device:
            device_map = self.maps[device.name]
            if isinstance(device, Frozen):  # the daemon's config: the map's points like its own
                device_map = freeze(device_map)
            return with_map(device, device_map)

        devices = [
            merged(d) if d.name in self.maps else d
            for d in config.devices
            if not is_sunspec(d) or d.name in self.maps
        ]
        return config.model_copy(update={"devices": devices})

    def _cached(self, config: Config, device: Device) -> DeviceMap | None:
        """`device`'s cached map, if it has a usable one; an unusable one is logged (once:
        each cache is looked at once for the device and link it is for)."""
        origin = walked_from(config, device)
        self._read.add((device.name, origin))
        path = cache_path(config.gateway.state_dir, device.name)
        cached = read_cache(path, origin)
        if isinstance(cached, str):
            log.warning("sunspec map cache not used", device=device.name, path=str(path),
                        error=cached)
            return None
        if cached is not None:
            log.info("sunspec device mapped from its cache", device=device.name,
                     points=len(cached.points), path=str(path))
        return cached

    async def resolve(
        self,
        config: Config,
        device: Device,
        link: Link,
        *,
        apply: Callable[[], list[str]],
        set_status: Callable[[str, bool], None],
    ) -> None:
        """Walk `device`'s chain until a walk succeeds; then keep its map, cache it and, if
        it changed, `apply()` the config again (returning what changed, for the log).

        Before the first walk, a device with no map yet gets its cached one, if any."""
        origin = walked_from(config, device)
        if device.name not in self.maps and (device.name, origin) not in self._read:
            cached = await asyncio.to_thread(self._cached, config, device)  # added by a reload
            if cached is not None:
                self.maps[device.name] = cached
                apply()
        chain = await self._walk(config, device, link, set_status)
        found = chain_map(chain, origin)
        known = self.maps.get(device.name)
        changes: list[str] = []
        if found != known:
            self.maps[device.name] = found
            path = cache_path(config.gateway.state_dir, device.name)
            try:
                await asyncio.to_thread(write_cache, path, found, device.name)
            except OSError as exc:  # the map still applies; only a restart without it suffers
                log.warning("sunspec map not cached", device=device.name, path=str(path),
                            error=exc.strerror or type(exc).__name__)
            changes = apply()
        log.info("sunspec device mapped", device=device.name, base=chain.base,
                 models=[m.id for m in chain.models], points=len(found.points),
                 changes=changes or ["map unchanged" if found == known else "nothing to restart"])

    async def _walk(
        self, config: Config, device: Device, link: Link, set_status: Callable[[str, bool], None]
    ) -> Chain:
        """The chain, walked again after each failure with the device's poll back-off."""
        from bridge.transports.sunspec import read_chain

        settings = modbus_link(config, device)
        max_registers = settings.max_registers if settings is not None else 125
        failures = 0
        cause: str | None = None
        while True:
            try:
                return await read_chain(link, device.unit, max_registers=max_registers)
            except Exception as exc:  # a bug must cost one walk, not the daemon
                failures += 1
                kind = type(exc).__name__
                if kind != cause:
                    cause = kind
                    detail = {} if isinstance(exc, BridgeError) else {"exc_info": exc}
                    log.warning("sunspec mapping failed, retrying", device=device.name,
                                error=str(exc) or kind, mapped=device.name in self.maps,
                                **detail)
                if failures == device.offline_after and device.name not in self.maps:
                    set_status(device.name, False)  # nothing polls it to say so
            await asyncio.sleep(backoff(failures, first=device.interval, cap=BACKOFF_CAP))
