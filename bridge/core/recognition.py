"""Which library map fits a device, from what it says it is or what its registers hold. Pure:
no I/O; `m2m-bridge discover` (bridge.tools.discover) does the asking.

By identification: FC43 (Read Device Identification) objects against each map's
`manufacturer` and `model`, compared as lower-case letters and digits only, so "EASTRON" is
"Eastron" and "SDM630-Modbus V2" is "sdm630modbusv2". A model matches when one text holds the
other: the map's whole model or one of its words with letters and digits ("sdm630", "pac3200",
"atv320"), in or around the device's ProductCode, ModelName or ProductName ("SDM630",
"SDM630MCT", "Eastron SDM630"). Short keys ("e44", "b23") count only when the vendor agrees
too: on their own they turn up inside unrelated names.

By signature: a map's `signature:` names some of its points and the range each value lies in
on the real device (mains volts, hertz). The registers are read once and judged by
bridge.core.plausibility as `probe` judges them: the map's reading (its type and byte order)
must lie in the range, scaled as the map scales it, and no other reading of the same registers
may look more plausible. A map fits when every check passes; the most checks win (a
three-phase meter's signature holds the single-phase one's), and maps with as many are named
as alternatives: registers alone cannot tell an SDM630 from an SDM72.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bridge.core.normalize import engineering
from bridge.core.plausibility import ORDERS_16, candidates
from bridge.errors import BridgeError
from bridge.registers import ByteOrder

if TYPE_CHECKING:
    from bridge.config import DeviceMap, Point
    from bridge.config.devices import SignatureCheck

MODEL_OBJECTS = ("ProductCode", "ModelName", "ProductName")
MIN_KEY = 3  # characters: "e44" is a model, "v2" is not
MIN_ALONE = 5  # characters a model key needs to match when the vendor does not
_WORDS = re.compile(r"[\s/(),;-]+")


def normalise(text: str) -> str:
    """Lower-case ASCII letters and digits only: "Lambda Wärmepumpen" -> "lambdawarmepumpen"."""
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]", "", folded.lower())


def _keys(text: str) -> set[str]:
    """The whole text and each of its words that has letters and digits, normalised."""
    words = {normalise(w) for w in _WORDS.split(text)}
    keys = {w for w in words if len(w) >= MIN_KEY and re.search(r"\d", w) and re.search("[a-z]", w)}
    whole = normalise(text)
    return keys | ({whole} if len(whole) >= MIN_KEY else set())


@dataclass(frozen=True, slots=True)
class LibraryDevice:
    """A library map as matching sees it: its name, what the device says, its signature."""

    name: str
    manufacturer: str
    model: str
    signature: tuple[tuple[Point, SignatureCheck], ...]

    @classmethod
    def of(cls, name: str, device_map: DeviceMap) -> LibraryDevice:
        order = device_map.byte_order or "ABCD"
        points = {p.name: p if p.byte_order else p.model_copy(update={"byte_order": order})
                  for p in device_map.points}
        return cls(name, device_map.manufacturer or "", device_map.model or "",
                   tuple((points[c.point], c) for c in device_map.signature))


@dataclass(frozen=True, slots=True)
class IdentityMatch:
    """A map whose model the device named; `vendor` says whether the maker agrees too."""

    name: str
    vendor: bool
    strength: int  # characters of the model text that matched

    @property
    def rank(self) -> tuple[bool, int]:
        return self.vendor, self.strength


def vendor_agrees(said: str, manufacturer: str) -> bool:
    """"EASTRON ELECTRONIC" and "Eastron"; "Schneider" and "Schneider Electric"."""
    vendor, maker = normalise(said), normalise(manufacturer)
    first = normalise(_WORDS.split(manufacturer.strip())[0]) if manufacturer.strip() else ""
    return bool(vendor and maker) and (
        (len(first) >= MIN_KEY and first in vendor) or (len(vendor) >= MIN_KEY and vendor in maker)
    )


def _model_strength(texts: Sequence[str], model: str) -> int:
    best = 0
    wanted = _keys(model)
    for text in texts:
        for said in _keys(text):
            for key in wanted:
                shorter = min(key, said, key=len)
                if (key in said or said in key) and re.search(r"\d", shorter):
                    best = max(best, len(shorter))
    return best


def match_identity(
    objects: Mapping[str, str], library: Sequence[LibraryDevice]
) -> list[IdentityMatch]:
    """The maps whose model the FC43 objects name, best first (the vendor agreeing, then the
    longer match, then by name)."""
    texts = [objects[k] for k in MODEL_OBJECTS if objects.get(k)]
    vendor = objects.get("VendorName", "")
    found = []
    for entry in library:
        strength = _model_strength(texts, entry.model) if entry.model else 0
        agrees = vendor_agrees(vendor, entry.manufacturer)
        if strength >= (MIN_KEY if agrees else MIN_ALONE):
            found.append(IdentityMatch(entry.name, agrees, strength))
    return sorted(found, key=lambda m: (not m.vendor, -m.strength, m.name))


def vendor_maps(objects: Mapping[str, str], library: Sequence[LibraryDevice]) -> list[str]:
    """The library maps of the maker the device names (none of which matched its model)."""
    vendor = objects.get("VendorName", "")
    return [e.name for e in library if vendor_agrees(vendor, e.manufacturer)]


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One signature check on the registers read: the map's value and whether it fits."""

    point: str
    value: object  # the engineering value as the map reads it; None if undecodable
    unit: str | None
    ok: bool

    def __str__(self) -> str:
        shown = "?" if self.value is None else f"{self.value}{' ' + self.unit if self.unit else ''}"
        return f"{self.point} {shown}"


def _order(point: Point) -> ByteOrder:
    """The byte order as plausibility names it: a 16-bit value has only AB and BA."""
    if point.size > 1:
        return point.order
    return ORDERS_16[0] if point.order in ("ABCD", "CDAB") else ORDERS_16[1]


def check(point: Point, want: SignatureCheck, words: Sequence[int]) -> CheckResult:
    """Whether `words` (the point's registers, read once) hold what the signature says."""
    if point.scale == 0:
        return CheckResult(point.name, None, point.unit, ok=False)
    low, high = sorted(((want.min - point.offset) / point.scale,
                        (want.max - point.offset) / point.scale))
    ranked = candidates(words, words, (low, high))
    mine = next((c for c in ranked if c.type == point.type and c.byte_order == _order(point)),
                None)
    if mine is None or isinstance(mine.value, str):
        return CheckResult(point.name, None, point.unit, ok=False)
    try:
        value = engineering(point, mine.value)
    except BridgeError:
        return CheckResult(point.name, None, point.unit, ok=False)
    ok = "in expected range" in mine.reasons and mine.score == ranked[0].score
    return CheckResult(point.name, value, point.unit, ok=ok)


@dataclass(frozen=True, slots=True)
class SignatureMatch:
    """A map whose every signature check passed, with what was read."""

    name: str
    checks: tuple[CheckResult, ...]


def best_signatures(matches: Sequence[SignatureMatch]) -> list[SignatureMatch]:
    """The maps with the most checks, by name: the first is taken, the rest are alternatives."""
    if not matches:
        return []
    most = max(len(m.checks) for m in matches)
    return sorted((m for m in matches if len(m.checks) == most), key=lambda m: m.name)
