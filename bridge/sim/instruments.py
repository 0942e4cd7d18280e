"""Simulated line instruments: each answers its `request` (or streams every `interval`) with a
line its own `response` regex matches, built from the regex itself with each named group
replaced by the point's simulated value.
"""

from __future__ import annotations

import random
import re
import warnings
from dataclasses import dataclass
from typing import Any

import structlog

from bridge.config import Device, Point
from bridge.core.codec import Value
from bridge.sim.frames import Protocol

with warnings.catch_warnings():  # sre_parse is the documented-enough parser of re's syntax
    warnings.simplefilter("ignore", DeprecationWarning)
    import sre_constants as sc
    import sre_parse

log = structlog.get_logger("bridge.sim.serial")


def example_line(pattern: str, groups: dict[str, str]) -> str:
    """A string `pattern` matches, with the named groups given in `groups` filled in as given
    (others from their own sub-pattern). Takes the shortest way through every construct."""
    compiled = re.compile(pattern)
    names = {number: name for name, number in compiled.groupindex.items()}
    out: list[str] = []
    _emit(sre_parse.parse(pattern), names, groups, out)
    return "".join(out)


def _emit(
    parsed: Any,  # sre_parse.SubPattern: (opcode, argument) pairs whose types vary by opcode
    names: dict[int, str],
    groups: dict[str, str],
    out: list[str],
) -> bool:
    """Append an example of `parsed` to `out`; whether it filled in any of `groups`."""
    filled = False
    for op, av in parsed:
        if op is sc.LITERAL:
            out.append(chr(av))
        elif op is sc.NOT_LITERAL:
            out.append("x" if av != ord("x") else "y")
        elif op is sc.ANY:
            out.append("x")
        elif op is sc.IN:
            out.append(_one_of(av))
        elif op in (sc.MAX_REPEAT, sc.MIN_REPEAT, getattr(sc, "POSSESSIVE_REPEAT", None)):
            low, _, sub = av
            once: list[str] = []
            # An optional part holding a value we want shown is taken once, else skipped.
            used = _emit(sub, names, groups, once)
            filled |= used
            out.extend(once * max(low, int(used)))
        elif op is sc.SUBPATTERN:
            number, _, _, sub = av
            name = names.get(number)
            if name is not None and name in groups:
                out.append(groups[name])
                filled = True
            else:
                filled |= _emit(sub, names, groups, out)
        elif op is sc.BRANCH:
            _, branches = av
            filled |= _emit(branches[0], names, groups, out)
        elif op is sc.ATOMIC_GROUP:
            filled |= _emit(av, names, groups, out)
        # AT (anchors), ASSERT, ASSERT_NOT, GROUPREF...: contribute no characters here
    return filled


_CATEGORY_CHAR: dict[object, str] = {
    sc.CATEGORY_DIGIT: "0", sc.CATEGORY_SPACE: " ", sc.CATEGORY_WORD: "a",
    sc.CATEGORY_NOT_DIGIT: "x", sc.CATEGORY_NOT_SPACE: "x", sc.CATEGORY_NOT_WORD: " ",
}


def _one_of(items: Any) -> str:
    negate = bool(items) and items[0][0] is sc.NEGATE
    if negate:
        excluded = {chr(av) for op, av in items if op is sc.LITERAL}
        return next(c for c in "xa0_- " if c not in excluded)
    for op, av in items:
        if op is sc.LITERAL:
            return chr(av)
        if op is sc.RANGE:
            return chr(av[0])
        if op is sc.CATEGORY:
            return _CATEGORY_CHAR.get(av, "x")
    return "x"


def _candidates(point: Point, value: Value) -> list[str]:
    """Ways an instrument might print `value` (engineering) for `point`, raw, most likely first."""
    if point.type == "string":
        return [str(value), "SIM"]
    if point.type == "bool":
        on = bool(value)
        return [*(a if on else b for a, b in
                  (("1", "0"), ("Y", "N"), ("true", "false"), ("ON", "OFF"), ("T", "F")))]
    raw = (float(value) - point.offset) / (point.scale or 1.0)
    if point.type.startswith(("int", "uint")):
        number = round(raw)
        return [str(number), f"{number:+d}", f"{number:05d}"]
    first = point.precision if point.precision is not None else 2
    texts = [f"{raw:.{d}f}" for d in dict.fromkeys((first, 1, 2, 3, 4, 0))]
    return texts + [f"{raw:+.{d}f}" for d in dict.fromkeys((first, 1, 2, 3, 4, 0))]


@dataclass
class _SimValue:
    point: Point
    value: Value
    center: float | None
    drift: float


class LineInstrument:
    """One configured line instrument: its request, and response lines with living values."""

    def __init__(self, device: Device, rng: random.Random) -> None:
        assert device.response is not None
        self.device = device
        self.regex = re.compile(device.response)
        self.request = None if device.request is None else device.request.encode("latin-1")
        self.eol = device.eol.encode("latin-1")
        self._rng = rng
        self.values: dict[str, _SimValue] = {}
        for point in device.points:
            if point.name not in self.regex.groupindex:
                continue
            hint = point.simulate
            value: Value
            if hint is not None and hint.value is not None:
                value = hint.value
            elif point.type == "bool":
                value = True
            elif point.type == "string":
                value = "SIM"
            else:
                value = 100 * point.scale + point.offset
            numeric = isinstance(value, int | float) and not isinstance(value, bool)
            drift = hint.drift if hint is not None else 0.0
            center = float(value) if numeric and drift > 0 else None
            self.values[point.name] = _SimValue(point, value, center, drift)

    def line(self) -> bytes:
        """A response line for the current values, checked against the regex."""
        chosen: dict[str, str] = {}
        for name, sim in self.values.items():
            options = _candidates(sim.point, sim.value)
            chosen[name] = options[0]
            for text in options:
                trial = example_line(self.regex.pattern, {**chosen, name: text})
                match = self.regex.search(trial)
                if match is not None and match.group(name) == text:
                    chosen[name] = text
                    break
            else:  # no way of printing the value fits the group: let the group print itself
                del chosen[name]
        text = example_line(self.regex.pattern, chosen)
        if self.regex.search(text) is None:
            log.warning("simulate: cannot build a line matching response", device=self.device.name)
        return text.encode("latin-1", errors="replace") + self.eol

    def tick(self) -> None:
        for sim in self.values.values():
            if sim.center is None:
                continue
            step = self._rng.uniform(-sim.drift, sim.drift) / 4
            current = float(sim.value)
            sim.value = min(max(current + step, sim.center - sim.drift), sim.center + sim.drift)


class LineInstruments(Protocol):
    """The line instruments of one `serial` link."""

    def __init__(self, instruments: list[LineInstrument]) -> None:
        self.asked = [i for i in instruments if i.request is not None]
        self.streaming = [i for i in instruments if i.request is None]
        if self.streaming:
            self.period = min(i.device.interval for i in self.streaming)
        self.unknown = 0

    def length(self, buffer: bytes) -> int | None:
        for inst in self.asked:
            assert inst.request is not None
            if buffer.startswith(inst.request):
                return len(inst.request)
            if inst.request.startswith(buffer):
                return None
        for inst in self.asked:  # not a request we know: skip up to its end, if it has one
            end = buffer.find(inst.eol)
            if end >= 0:
                self.unknown += 1
                return -(end + len(inst.eol))
        return 0

    def answer(self, request: bytes) -> bytes | None:
        for inst in self.asked:
            if request == inst.request:
                return inst.line()
        return None

    def stream(self) -> bytes | None:
        return b"".join(inst.line() for inst in self.streaming) or None

    def tick(self) -> None:
        for inst in [*self.asked, *self.streaming]:
            inst.tick()
