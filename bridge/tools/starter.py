"""The starter config `m2m-bridge discover` writes: the link it scanned, a broker on localhost,
one device per unit that answered, and above each device a comment saying how it was
recognised and what to check by hand. SunSpec devices get the map of their model chain in
`maps/` beside the config.

The YAML is written as text, a block per device, because the comments are the point: a YAML
library would drop them. The values themselves go through yaml.safe_dump, so a device's odd
name or path is quoted as YAML needs.
"""

from __future__ import annotations

import datetime
import platform
import re
import textwrap
from pathlib import Path
from typing import Any

import yaml

from bridge.errors import UsageError
from bridge.tools.discover import Discovery, Found
from bridge.tools.oneshot import parse_url
from bridge.tools.sunspec import source_text, write_map
from bridge.transports.modbus import Endpoint

MAPS_DIR = "maps"
WIDTH = 96


def _name(text: str) -> str:
    """`text` as a config name ([A-Za-z0-9_-])."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-") or "bus"


def link_entry(endpoint: Endpoint) -> dict[str, Any]:
    """The config's link for the scanned URL, named after its port or host."""
    if endpoint.is_serial:
        return {"name": _name(Path(endpoint.host).name), "type": endpoint.kind,
                "port": endpoint.host, "baudrate": endpoint.baudrate, "parity": endpoint.parity,
                "stopbits": endpoint.stopbits, "bytesize": endpoint.bytesize}
    return {"name": _name(f"{endpoint.kind}-{endpoint.host}"), "type": endpoint.kind,
            "host": endpoint.host, "port": endpoint.port}


def write_sunspec_maps(discovery: Discovery, directory: Path) -> None:
    """Each SunSpec device's map as `maps/<device>-sunspec.yaml` under `directory`; its
    `map` then names that file (relative, as a config's map paths are)."""
    for found in discovery.found:
        if found.chain is None:
            continue
        relative = f"{MAPS_DIR}/{found.name}-sunspec.yaml"
        path = directory / relative
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"{path.parent}: cannot make the maps directory: "
                             f"{exc.strerror or exc}") from None
        write_map(path, found.chain,
                  source=source_text(discovery.url, found.unit, found.chain),
                  command=f"m2m-bridge discover {discovery.url}")
        found.map = relative


def _comment(text: str, indent: str) -> list[str]:
    """`text` as comment lines (wrapped; anything a device sent that is not printable ASCII
    shown as `?`, so it cannot end the comment)."""
    clean = "".join(c if " " <= c <= "~" else "?" for c in text)
    return textwrap.wrap(clean, WIDTH - len(indent) - 2, initial_indent=f"{indent}# ",
                         subsequent_indent=f"{indent}#   ", break_on_hyphens=False,
                         break_long_words=False)


def _device(found: Found, link: str) -> list[str]:
    lines = _comment(f"unit {found.unit}: {found.how}", "  ")
    for note in found.check:
        lines += _comment(f"check: {note}", "  ")
    entry: dict[str, Any] = {"name": found.name, "link": link, "unit": found.unit}
    if found.map is not None:
        entry["map"] = found.map
    body = yaml.safe_dump([entry], sort_keys=False, allow_unicode=False, width=WIDTH)
    lines += [f"  {line}" for line in body.splitlines()]
    if found.match is None:
        lines += ["    # no map: add its points here (name, table, address, type), or map: FILE",
                  "    points: []"]
    return lines


def starter_config(discovery: Discovery, *, command: str) -> str:
    """The config text; SunSpec maps must be written first (write_sunspec_maps)."""
    link = link_entry(parse_url(discovery.url, timeout=1.0))
    recognised = sum(1 for f in discovery.found if f.match is not None)
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    head = [
        *_comment(f"Starter config made by `{command}`, {when}: {len(discovery.found)} of "
                  f"{discovery.probed} units answered, {recognised} recognised.", ""),
        *_comment("Read the comment above each device and check what it says by hand before "
                  "trusting the values; `m2m-bridge validate -c FILE` checks the format and "
                  "`m2m-bridge read -c FILE DEVICE` reads a device once.", ""),
    ]
    gateway = _name(platform.node()) if platform.node() else "gateway"
    top = yaml.safe_dump({"version": 1, "gateway": {"id": gateway}}, sort_keys=False)
    mqtt = ["mqtt:", "  host: localhost  # the broker: yours (port, username, password, tls: "
            "see the README)", "  port: 1883"]
    links = ["links:", *(f"  {line}" for line in
                         yaml.safe_dump([link], sort_keys=False, width=WIDTH).splitlines())]
    devices = ["devices:"]
    for found in discovery.found:
        devices += _device(found, link["name"])
    return "\n".join([*head, top.rstrip("\n"), *mqtt, *links, *devices]) + "\n"


def save(path: Path, text: str) -> None:
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"-o {path}: cannot write: {exc.strerror or exc}") from None
