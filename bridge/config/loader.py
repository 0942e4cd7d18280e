"""Loading the config file: read, substitute secrets, validate, merge maps, locate errors.

`load_config` reads the YAML (bridge.yamlsource keeps every line), substitutes secrets
(bridge.secrets), validates with the pydantic models below, then loads each device's map,
merges its points and checks what needs more than one model (links named, names unique,
addresses given). Every problem becomes a ConfigIssue and all of them are raised together in
one ConfigError.

Problems inside a map file name the map file, its own line and its own path (`points[2].type`),
so the integrator fixes the map once; problems that depend on the device using the map (a
missing address on a Modbus link) are reported in the map file too, where the point is.

After load, every device's `points` is the merged list (map points in map order, device points
of the same name replacing them in place, new ones appended), and every point's `byte_order`
is set: its own, else the device's, else the map's, else ABCD.

A `map: sunspec` device names no file: its map is its SunSpec model chain, walked by the daemon
(bridge.sunspec_maps). Here it keeps its own points only; the daemon merges the chain's map
into it with `with_map`, by the same rule.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydantic import TypeAdapter, ValidationError

from bridge.config.devices import scale_from_problems
from bridge.config.library import PREFIX as LIBRARY
from bridge.config.library import SUNSPEC, library_path, unknown_map
from bridge.config.model import (
    Config,
    Device,
    DeviceMap,
    LineLink,
    Link,
    Point,
    SerialLink,
    TcpLink,
)
from bridge.config.secrets import Loc
from bridge.config.yamlsource import Document, UnreadableFileError, read_document, type_secrets
from bridge.errors import ConfigError, ConfigIssue

T = TypeVar("T")
_LINK: TypeAdapter[TcpLink | SerialLink | LineLink] = TypeAdapter(Link)


def load_config(
    path: str | Path, *, environ: Mapping[str, str] | None = None, check_state_dir: bool = False
) -> Config:
    """Load and check the config at `path`; raise ConfigError listing every problem found.

    `environ` (default os.environ) supplies `${env:…}`, $CREDENTIALS_DIRECTORY and
    $STATE_DIRECTORY, so tests and reloads need not touch the process environment.
    `check_state_dir` also creates the state directory and proves it writable: `validate`,
    `run` and reload want that; one-off reads on a gateway, often by another user, do not.
    """
    environ = os.environ if environ is None else environ
    try:
        main, issues = read_document(Path(path), str(path), environ)
    except UnreadableFileError as exc:
        raise ConfigError([ConfigIssue(str(path), 0, "", f"cannot read: {exc}")]) from None
    type_secrets(main, lambda data: Config.model_validate(data, context={"environ": environ}))
    config: Config | None = None
    try:
        config = Config.model_validate(main.data, context={"environ": environ})
    except ValidationError as exc:
        issues += main.validation_issues(exc)
    # Cross-checks run on whatever validated, so one bad device hides no other's problems.
    links = _valid_items(main, "links", _LINK.validate_python)
    devices = _valid_items(main, "devices", Device.model_validate)
    issues += main.duplicate_names("links") + main.duplicate_names("devices")
    issues += _unknown_links(main, {name for _, name in main.names("links")})
    issues += _northbound_format(main)
    maps = _Maps(Path(path).parent, environ)
    by_name = {link.name: link for _, link in links}
    merged = [_complete(main, index, device, by_name, maps) for index, device in devices]
    issues += [
        issue
        for index in range(len(main.items("devices")))
        for issue in main.duplicate_names(("devices", index, "points"))
    ]
    issues += maps.issues + [issue for _, found, _ in merged for issue in found]
    state_dir = _state_dir(Path(path), config)
    if check_state_dir and config is not None:
        problem = state_dir_problem(state_dir)
        if problem is not None:
            at: Loc = ("gateway", "state_dir")
            source = ""
            if at not in main.lines:  # say where a path nobody wrote in this file came from
                source = " ($STATE_DIRECTORY)" if "STATE_DIRECTORY" in environ else " (default)"
            issues.append(main.issue(at, f"cannot use {str(state_dir)!r}{source}: {problem}"))
    if issues or config is None:
        raise ConfigError(_ordered(issues, main))
    gateway = config.gateway.model_copy(update={"state_dir": str(state_dir)})
    config = config.model_copy(
        update={"gateway": gateway, "devices": share_points([device for device, _, _ in merged])}
    )
    config._source = str(path)
    config._warnings = _ordered([w for _, _, found in merged for w in found], main)
    config._secrets = main.secret_values.union(*(doc.secret_values for doc in maps.documents()))
    return config


def _ordered(issues: list[ConfigIssue], main: Document) -> list[ConfigIssue]:
    """The main file's issues first, then each map's, by line; a map shared by two devices
    reports a problem once."""
    return sorted(dict.fromkeys(issues), key=lambda i: (i.file != main.file, i.file, i.line))


def _state_dir(config_path: Path, config: Config | None) -> Path:
    """The state directory, a relative one taken from the config file's folder like map paths
    (the daemon's working directory is `/` under systemd)."""
    configured = Path(config.gateway.state_dir if config is not None else "./state")
    return Path(os.path.abspath(config_path.parent / configured))


def state_dir_problem(directory: Path) -> str | None:
    """Why the daemon could not keep its buffer in `directory`, or None if it can.

    Creates the directory and a file in it, as the buffer will: a read-only mount, a path
    under /proc or a missing permission shows up now, in one line, not as a traceback from
    SQLite once devices are being polled.
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):
            pass
    except (FileExistsError, NotADirectoryError):
        return "it is not a directory (or a part of its path is a file)"
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    buffer = directory / "buffer.sqlite3"
    for file in (buffer, buffer.with_name("buffer.sqlite3-wal")):
        if file.exists() and not os.access(file, os.R_OK | os.W_OK):
            return f"{file.name} in it is not readable and writable"
    return None


def load_library_map(name: str) -> DeviceMap:
    """The packaged map `name` (`library:NAME` in a device), checked as any map file is;
    ConfigError if there is no such map or it has problems."""
    maps = _Maps(Path(), {})
    loaded = maps.get(LIBRARY + name)
    if isinstance(loaded, str):
        raise ConfigError([ConfigIssue(LIBRARY + name, 0, "", loaded)])
    if loaded is None or maps.issues:
        raise ConfigError(maps.issues)
    return loaded[0]


class _Maps:
    """Map files, each read and validated once however many devices use it."""

    def __init__(self, base: Path, environ: Mapping[str, str]) -> None:
        self.base = base
        self.environ = environ
        self.issues: list[ConfigIssue] = []
        self._loaded: dict[Path, tuple[DeviceMap, Document] | str | None] = {}
        self.library: set[str] = set()  # files of library maps that loaded (Document.file)

    def get(self, name: str) -> tuple[DeviceMap, Document] | str | None:
        """The map at `name` (relative to the main file, or `library:NAME`); why it is
        unreadable (for a library name, the whole message); or None if it has problems
        (already in `issues`)."""
        if name.startswith(LIBRARY):
            packaged = library_path(name.removeprefix(LIBRARY))
            if packaged is None:
                return unknown_map(name.removeprefix(LIBRARY))
            self.library.add(str(packaged))
            file = packaged
        else:
            file = self.base / name
        if file not in self._loaded:
            self._loaded[file] = self._load(file)
        return self._loaded[file]

    def documents(self) -> list[Document]:
        """The map files that loaded."""
        return [loaded[1] for loaded in self._loaded.values() if isinstance(loaded, tuple)]

    def _load(self, file: Path) -> tuple[DeviceMap, Document] | str | None:
        try:
            doc, issues = read_document(file, str(file), self.environ)
        except UnreadableFileError as exc:
            return str(exc)
        except ConfigError as exc:
            self.issues += exc.issues
            return None
        self.issues += issues
        type_secrets(doc, DeviceMap.model_validate)
        try:
            device_map = DeviceMap.model_validate(doc.data)
        except ValidationError as exc:
            self.issues += doc.validation_issues(exc)
            return None
        self.issues += doc.duplicate_names("points")
        return device_map, doc


def _complete(
    main: Document,
    index: int,
    device: Device,
    links: Mapping[str, TcpLink | SerialLink | LineLink],
    maps: _Maps,
) -> tuple[Device, list[ConfigIssue], list[ConfigIssue]]:
    """Merge the device's map into it and check what needs its link; return it, its problems
    and its warnings."""
    at: Loc = ("devices", index)
    issues: list[ConfigIssue] = []
    loaded = maps.get(device.map) if device.map not in (None, SUNSPEC) else None
    if isinstance(loaded, str) and device.map is not None and device.map.startswith(LIBRARY):
        issues.append(main.issue((*at, "map"), loaded))
    elif isinstance(loaded, str):
        shown = main.show((*at, "map"), device.map)  # `<secret>` if a secret named it
        issues.append(main.issue((*at, "map"), f"cannot read map file {shown}: {loaded}"))
    device_map, map_doc = loaded if isinstance(loaded, tuple) else (DeviceMap(), main)
    # Each point keeps the file and path it came from, so problems point at its own line.
    from_map: list[tuple[Point, Document, Loc]] = [
        (p, map_doc, ("points", k)) for k, p in enumerate(device_map.points)
    ]
    own: list[tuple[Point, Document, Loc]] = [
        (p, main, (*at, "points", j)) for j, p in enumerate(device.points)
    ]
    entries = merged(from_map, own, name=lambda entry: entry[0].name)
    names = {point.name for point, _, _ in entries}
    link = links.get(device.link)
    if device.map == SUNSPEC and isinstance(link, LineLink):
        issues.append(main.issue((*at, "map"), (
            f"map: sunspec reads a SunSpec model chain over Modbus; link {device.link!r} "
            "is a serial line link (type: serial)")))
    if isinstance(link, LineLink):
        if device.response is None:
            issues.append(main.issue((*at, "response"), "required for a device on a serial link"))
        else:
            issues += [
                main.issue(
                    (*at, "response"),
                    f"named group {main.show((*at, 'response'), group)} matches no point",
                )
                for group in re.compile(device.response).groupindex
                if group not in names
            ]
        issues += [
            doc.issue((*path, "writable"), "line instruments are read-only")
            for point, doc, path in entries
            if point.writable
        ]
        issues += [
            doc.issue((*path, "scale_from"), "only for Modbus registers (a line instrument's "
                      "values are parsed text)")
            for point, doc, path in entries
            if point.scale_from is not None
        ]
    elif link is not None:
        if device.response is not None:
            issues.append(
                main.issue((*at, "response"), f"only for serial line links, not {link.type}")
            )
        issues += [
            doc.issue((*path, "address"), "required for points on a Modbus link")
            for point, doc, path in entries
            if point.address is None
        ]
    if device.map != SUNSPEC and not isinstance(link, LineLink):
        # A `map: sunspec` device's own points may name the chain's, known once it is walked
        # (bridge.sunspec_maps checks them then).
        issues += [
            entries[index][1].issue((*entries[index][2], "scale_from"), message)
            for index, message in scale_from_problems([point for point, _, _ in entries])
        ]
    # Library maps' high addresses are the vendor's (Janitza's 19000s), and SunSpec maps'
    # (and the own points of a `map: sunspec` device) the device's (the chain starts at 40000).
    deliberate = (isinstance(link, LineLink) or device_map.sunspec_base is not None
                  or device.map == SUNSPEC)
    warnings = [] if deliberate else [
        doc.issue((*path, "address"), message)
        for point, doc, path in entries
        if doc.file not in maps.library and (message := _modicon_warning(point)) is not None
    ]
    return with_map(device, device_map), issues, warnings


def with_map(device: Device, device_map: DeviceMap) -> Device:
    """`device` with the points of `device_map` merged in: the map's points in map order, the
    device's own points of the same name replacing them in place, new ones appended; every
    point's byte order set (its own, else the device's, else the map's, else ABCD); the map's
    description, manufacturer and model where the device names none.

    The loader merges a map file so; the daemon merges a `map: sunspec` device's chain so once
    it is walked (bridge.sunspec_maps), into the device as loaded (its own points only).
    """
    order = device.byte_order or device_map.byte_order or "ABCD"
    points = [
        point if point.byte_order else point.model_copy(update={"byte_order": order})
        for point in merged(device_map.points, device.points, name=lambda point: point.name)
    ]
    described = {
        key: getattr(device_map, key)
        for key in ("description", "manufacturer", "model")
        if getattr(device, key) is None
    }
    return device.model_copy(update={"points": points, **described})


def share_points(devices: list[Device]) -> list[Device]:
    """`devices` with equal points (one map's, a pasted list's) as one Point object each:
    points are frozen, and a Point is ~700 bytes, so 500 devices of one 30-point map hold 30
    of them, not 15,000 (~10 MiB)."""
    seen: dict[str, Point] = {}
    return [
        device.model_copy(
            update={"points": [seen.setdefault(p.model_dump_json(), p) for p in device.points]})
        for device in devices
    ]


def merged(base: Sequence[T], own: Sequence[T], *, name: Callable[[T], str]) -> list[T]:
    """`base` with `own` merged in by `name`: same names replaced in place, new ones appended
    in order; of two own items with one name the first counts (the second is reported by
    Document.duplicate_names, from the raw data)."""
    result = list(base)
    position = {name(item): k for k, item in enumerate(result)}
    seen: set[str] = set()
    for item in own:
        key = name(item)
        if key in seen:
            continue
        seen.add(key)
        if key in position:
            result[position[key]] = item
        else:
            position[key] = len(result)
            result.append(item)
    return result


# Modicon notation numbers holding registers from 40001 and input registers from 30001;
# the config wants the 0-based PDU address, and this is the commonest off-by-40001.
_MODICON_BASE = {"holding": 40001, "input": 30001}


def _modicon_warning(point: Point) -> str | None:
    base = _MODICON_BASE.get(point.table)
    if base is None or point.address is None or not base <= point.address < base + 9999:
        return None
    likely = point.address - base
    return (
        f"warning: Modicon numbering? {point.table} {point.address} is usually address "
        f"{likely} (0-based); if {point.address} is meant, ignore this"
    )


def _valid_items(doc: Document, key: str, validate: Any) -> list[tuple[int, Any]]:
    """(index, model) for each item of the list `key` that validates on its own."""
    result: list[tuple[int, Any]] = []
    for index, item in enumerate(doc.items(key)):
        try:
            result.append((index, validate(item)))
        except ValidationError:
            continue  # already reported by the whole-file validation
    return result


def _northbound_format(doc: Document) -> list[ConfigIssue]:
    """`mqtt.format: sparkplug` and the `mqtt.sparkplug` block go together, and Home Assistant
    discovery (JSON topics) does not go with Sparkplug (which replaces those topics).

    Read from the raw data, like _unknown_links: the ids themselves are checked by the model.
    """
    mqtt = doc.data.get("mqtt") if isinstance(doc.data, dict) else None
    if not isinstance(mqtt, dict):
        return []
    sparkplug_format = mqtt.get("format") == "sparkplug"
    block = mqtt.get("sparkplug")
    issues = []
    if block is not None and not sparkplug_format:
        issues.append(doc.issue(("mqtt", "sparkplug"),
                                f"only with mqtt.format: sparkplug (format is "
                                f"{mqtt.get('format', 'json')!r})"))
    if sparkplug_format and block is None:  # a block without group_id: the model says so
        issues.append(doc.issue(("mqtt", "format"),
                                "format: sparkplug needs mqtt.sparkplug.group_id"))
    if sparkplug_format and mqtt.get("homeassistant") is not None:
        issues.append(doc.issue(("mqtt", "homeassistant"),
                                "Home Assistant discovery describes the JSON topics, which "
                                "format: sparkplug replaces; use one or the other"))
    return issues


def _unknown_links(doc: Document, known: set[str]) -> list[ConfigIssue]:
    """An issue at each device's `link` that names no link, listing the links there are.

    Read from the raw data, so a device with a bad point still has its link checked.
    """
    issues = []
    shown = [doc.show(("links", index, "name")) for index, _ in doc.names("links")]
    there = f"links are: {', '.join(shown)}" if shown else "no links are defined"
    for index, item in enumerate(doc.items("devices")):
        at: Loc = ("devices", index, "link")
        link = item.get("link") if isinstance(item, dict) else None
        if isinstance(link, str) and link not in known:
            issues.append(doc.issue(at, f"unknown link {doc.show(at)} ({there})"))
    return issues
