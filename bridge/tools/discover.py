"""`m2m-bridge discover`: what is on a link, unit by unit, and the map each one needs.

A scan (bridge.tools.scan) finds the units that answer; each is then asked, in this order:

1. FC43 (Read Device Identification): what it says it is, kept for the match in step 3;
2. the SunSpec marker (40000, 0, 50000): a SunSpec device's model chain is walked and becomes
   its map, read from the device itself, so it wins over anything the library holds;
3. the library, by the FC43 vendor and model (bridge.core.recognition);
4. the library maps' `signature:` (mains volts and hertz where a meter keeps them), for the
   devices that say nothing or something the library does not know;
5. otherwise the device is unknown: the starter config gets it without a map, and a hint.

The scan keeps its own `--timeout` (dead units cost that much each); the questions to units
that answered wait at least UNIT_TIMEOUT, since a SunSpec walk moves 125 registers a read and a
device that does not support FC43 often refuses it by silence.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bridge.config import library_names, load_library_map
from bridge.core.bustime import silence
from bridge.core.codec import Table
from bridge.core.planner import ReadRequest
from bridge.core.recognition import (
    CheckResult,
    IdentityMatch,
    LibraryDevice,
    SignatureMatch,
    best_signatures,
    check,
    match_identity,
    vendor_maps,
)
from bridge.core.sunspec import Chain, NotSunSpec, SunSpecError
from bridge.errors import DeviceError
from bridge.tools.identify import object_text
from bridge.tools.oneshot import parse_url
from bridge.tools.scan import GATEWAY_NO_TARGET, Answer, Progress, scan
from bridge.transports.identification import object_name, read_device_identification
from bridge.transports.link import Link
from bridge.transports.modbus import ModbusClient
from bridge.transports.modbus_errors import NoResponse
from bridge.transports.sunspec import read_chain

UNIT_TIMEOUT = 1.0  # seconds, at least, for the questions after the scan
# Kinds of SunSpec device by model id, for the device's name (SunSpec model ranges: 101-113
# inverters, 201-214 meters, 802-803 batteries).
SUNSPEC_KINDS = (
    (range(101, 114), "inverter"),
    (range(201, 215), "meter"),
    (range(802, 804), "battery"),
)


@dataclass(slots=True)
class Found:
    """One unit that answered the scan, and what it was recognised as."""

    unit: int
    answer: str  # what it answered the scan with
    identity: dict[str, str] | None = None  # FC43 objects by name; None: not given
    identity_note: str = ""  # why there are none
    by: str | None = None  # "fc43", "sunspec", "signature" or None (unknown)
    match: str | None = None  # the library map's name, or "sunspec"
    said: str = ""  # identified as: maker and model
    how: str = ""  # one line: how it was recognised
    check: list[str] = field(default_factory=list)  # what to check by hand
    chain: Chain | None = None
    name: str = ""
    map: str | None = None  # what the config's `map:` says (set when the config is made)

    def as_json(self) -> dict[str, Any]:
        return {"unit": self.unit, "name": self.name, "answer": self.answer,
                "identity": self.identity, "match": self.match, "by": self.by,
                "how": self.how, "check": self.check, "map": self.map}

    def row(self) -> tuple[str, ...]:
        return (str(self.unit), self.answer, self.said or "?", self.how, self.map or "")


@dataclass(frozen=True, slots=True)
class Discovery:
    url: str
    found: list[Found]
    probed: int
    seconds: float


def library_devices() -> list[LibraryDevice]:
    return [LibraryDevice.of(name, load_library_map(name)) for name in library_names()]


async def discover(
    url: str,
    *,
    units: list[int],
    timeout: float,  # noqa: ASYNC109 - the scan's per-request timeout, passed to pymodbus
    progress: Progress | None = None,
) -> Discovery:
    """Scan `units` at `url` and recognise each one that answered."""
    started = time.monotonic()
    library = library_devices()  # before the bus is touched: a broken map fails first
    scanned = await scan(url, units=units, timeout=timeout, progress=progress)
    endpoint = parse_url(url, timeout=max(timeout, UNIT_TIMEOUT))
    quiet = silence(endpoint.baudrate) if endpoint.is_serial else 0.0
    link = Link(ModbusClient(endpoint, backoff_cap=0), silence=quiet)
    try:
        found = [await _recognise(link, url, answer, library) for answer in scanned.found]
    finally:
        link.close()
    return Discovery(url, found, scanned.probed, time.monotonic() - started)


async def _recognise(
    link: Link, url: str, answer: Answer, library: Sequence[LibraryDevice]
) -> Found:
    found = Found(answer.unit, answer.answer)
    await _identify(link, found)
    maker = " ".join(filter(None, ((found.identity or {}).get("VendorName"),
                                   _model_said(found.identity or {}))))
    found.said = maker
    said = f"FC43 says {maker}" if maker else found.identity_note
    found.chain = await _sunspec(link, found)
    if found.chain is not None:
        _by_sunspec(found, found.chain)
        return found
    matches = match_identity(found.identity or {}, library) if found.identity else []
    if matches:
        _by_identity(found, said, matches, library)
        return found
    signatures = await _signatures(link, answer.unit, library)
    if signatures:
        _by_signature(found, said, signatures, library)
        return found
    known = vendor_maps(found.identity or {}, library)
    found.name = f"unit-{answer.unit}"
    found.how = f"{said}: no library map" if maker else "no identification"
    if known:
        found.check.append(f"the library's maps of this maker ({', '.join(known)}) do not "
                           "name this model")
    found.check += [
        "the device's manual for its registers: `m2m-bridge probe "
        f"{shlex.quote(url)} --unit {answer.unit} --table input --address 0 --expect "
        "LOW..HIGH` shows which type and byte order they hold; then add points here, or a "
        "map file",
    ]
    return found


def _model_said(objects: dict[str, str]) -> str:
    return next((objects[k] for k in ("ModelName", "ProductCode", "ProductName")
                 if objects.get(k)), "")


async def _identify(link: Link, found: Found) -> None:
    """FC43's objects into `found`, or why there are none."""
    try:
        ident = await read_device_identification(link, found.unit)
    except NoResponse:
        found.identity_note = "no reply to FC43 (not supported?)"
        return
    except DeviceError as exc:
        if exc.code in GATEWAY_NO_TARGET or exc.code is None:
            found.identity_note = "no usable reply to FC43"
        else:
            found.identity_note = f"FC43 refused (exception {exc.code:02d})"
        return
    found.identity = {object_name(k): object_text(v) for k, v in sorted(ident.objects.items())}


async def _sunspec(link: Link, found: Found) -> Chain | None:
    """The unit's SunSpec chain, or None (not SunSpec; a broken chain is noted for the user)."""
    try:
        return await read_chain(link, found.unit)
    except NotSunSpec:
        return None
    except SunSpecError as exc:  # the marker, then a chain that does not hold up
        found.check.append(f"a SunSpec marker, but {exc}")
        return None
    except (NoResponse, DeviceError):
        return None  # silent or garbled where the marker would be: not one to walk


def _sunspec_kind(chain: Chain) -> str:
    ids = {m.id for m in chain.models}
    return next((kind for span, kind in SUNSPEC_KINDS if ids & set(span)), "sunspec")


def _by_sunspec(found: Found, chain: Chain) -> None:
    ids = ", ".join(str(m.id) for m in chain.models)
    maker = " ".join(filter(None, (chain.common("Mn"), chain.common("Md"))))
    found.by, found.match = "sunspec", "sunspec"
    found.name = f"{_sunspec_kind(chain)}-{found.unit}"
    found.said = maker or found.said or "SunSpec device"
    found.how = f"SunSpec models {ids} at {chain.base}"
    found.check = [*found.check,
                   "scale factors (*_SF) are read with every poll (`scale_from:`); after a "
                   "firmware update that changes the models make the map again (discover, or "
                   f"m2m-bridge sunspec --unit {found.unit} --write FILE)",
                   "points the device reported as not implemented are left out"]


def _entry(library: Sequence[LibraryDevice], name: str) -> LibraryDevice:
    return next(e for e in library if e.name == name)


def _compare(name: str) -> str:
    return (f"compare `m2m-bridge read -c FILE {name}` with the device's own display: "
            "CT/VT ratios and scales the device applies or not")


def _by_identity(found: Found, said: str, matches: Sequence[IdentityMatch],
                 library: Sequence[LibraryDevice]) -> None:
    best = matches[0]
    entry = _entry(library, best.name)
    found.by, found.match, found.map = "fc43", best.name, f"library:{best.name}"
    found.name = f"{best.name}-{found.unit}"
    found.said = f"{entry.manufacturer} {entry.model}"
    found.how = f"{said} -> library:{best.name}"
    found.check = [*found.check,
                   "the unit id set on the device", _compare(found.name)]
    if not best.vendor:
        vendor = (found.identity or {}).get("VendorName", "")
        found.check.insert(0, f"FC43 names the maker {vendor!r}, the map {entry.manufacturer!r}: "
                              "a rebadged device? check the manual")
    others = [m.name for m in matches[1:] if m.rank == best.rank]
    if others:
        found.check.insert(0, f"the model also fits {', '.join(others)}: check the nameplate")


async def _signatures(link: Link, unit: int,
                      library: Sequence[LibraryDevice]) -> list[SignatureMatch]:
    """The maps whose signatures the unit's registers fit, best first (see recognition)."""
    words: dict[tuple[Table, int, int], list[int] | None] = {}  # each register range read once

    async def read(table: Table, address: int, count: int) -> list[int] | None:
        key = (table, address, count)
        if key not in words:
            request = ReadRequest(table=table, address=address, count=count, points=(),
                                  layout=None)
            try:
                words[key] = await link.read(unit, request)
            except (NoResponse, DeviceError):
                words[key] = None  # not there: not this device
        return words[key]

    fits = []
    for entry in library:
        results: list[CheckResult] = []
        for point, want in entry.signature:
            got = await read(point.table, point.address or 0, point.size)
            result = None if got is None else check(point, want, got)
            if result is None or not result.ok:
                break  # one check failed: the rest of this map need not be read
            results.append(result)
        else:
            if results:
                fits.append(SignatureMatch(entry.name, tuple(results)))
    return best_signatures(fits)


def _by_signature(found: Found, said: str, fits: Sequence[SignatureMatch],
                  library: Sequence[LibraryDevice]) -> None:
    best = fits[0]
    entry = _entry(library, best.name)
    read = ", ".join(str(c) for c in best.checks)
    found.by, found.match, found.map = "signature", best.name, f"library:{best.name}"
    found.name = f"{best.name}-{found.unit}"
    found.said = f"{entry.manufacturer} {entry.model}?"
    found.how = f"{said}; registers fit library:{best.name} ({read})"
    others = [f.name for f in fits[1:]]
    found.check = [*found.check,
                   "the nameplate: recognised by register values alone"
                   + (f"; {', '.join(others)} read the same registers" if others else ""),
                   _compare(found.name)]

