"""Normalisation and on-change reporting."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.core.codec import Value
from bridge.core.normalize import BadValue, ChangeFilter, engineering
from bridge.core.scalefactors import normalize_all


@dataclass(frozen=True)
class P:
    scale: float = 1
    offset: float = 0
    precision: int | None = None
    values: Mapping[int, str] | None = None
    name: str = "p"
    scale_from: str | None = None


class TestEngineering:
    """Raw values become what the user sees."""

    def test_scale_offset_precision(self) -> None:
        """value = raw * scale + offset, rounded to precision."""
        assert engineering(P(scale=0.1, offset=-40, precision=1), 655) == 25.5

    def test_scaled_integer_has_no_float_noise(self) -> None:
        """An integer register times 0.1 publishes 21.5, not 21.500000000000004."""
        assert engineering(P(scale=0.1), 215) == 21.5
        assert repr(engineering(P(scale=0.1), 214)) == "21.4"
        assert engineering(P(scale=0.01, offset=-40), 6543) == 25.43
        assert engineering(P(scale=2), 21) == 42

    def test_integers_stay_integers_without_scaling(self) -> None:
        """A counter with scale 1 is published as 1234, not 1234.0."""
        value = engineering(P(), 1234)
        assert value == 1234
        assert isinstance(value, int)

    def test_precision_zero_gives_an_integer(self) -> None:
        """precision 0 publishes a whole number."""
        assert engineering(P(scale=0.5, precision=0), 5) == 2

    def test_enum_name(self) -> None:
        """A `values` map publishes the state's name; an unlisted state stays a number."""
        point = P(values={0: "stopped", 1: "running"})
        assert engineering(point, 1) == "running"
        assert engineering(point, 7) == 7

    def test_bools_and_strings_pass_through(self) -> None:
        """Scaling never applies to bools and strings."""
        assert engineering(P(scale=10), True) is True
        assert engineering(P(scale=10), "SN1") == "SN1"

    def test_nan_is_refused(self) -> None:
        """NaN cannot be published as JSON: it is refused, to be counted."""
        with pytest.raises(BadValue):
            engineering(P(), float("nan"))

    @given(
        scale=st.sampled_from([1, 1.0, 0.1, 2, -1]),
        offset=st.sampled_from([0, 0.0, -40, 0.5]),
        precision=st.sampled_from([None, 0, 2]),
        values=st.sampled_from([None, {0: "off", 1: "on"}]),
        raw=st.one_of(st.integers(-(2**63), 2**64), st.floats(), st.booleans(), st.text()),
    )
    def test_a_poll_normalises_as_each_value_alone(
        self, scale: float, offset: float, precision: int | None,
        values: Mapping[int, str] | None, raw: Value,
    ) -> None:
        """normalize_all (a poll's values; its shortcut for integers published as read) gives
        what engineering() gives each value, type included, and counts what it refuses."""
        point = P(scale=scale, offset=offset, precision=precision, values=values)
        into: dict[str, Value] = {}
        bad = normalize_all([(point, raw)], into)
        try:
            expected = engineering(point, raw)
        except BadValue:
            assert (bad, into) == (1, {})
            return
        assert bad == 0
        assert into == {"p": expected}
        assert type(into["p"]) is type(expected)


class TestChangeFilter:
    """report: on-change with deadband and heartbeat."""

    def test_first_reading_passes_then_unchanged_does_not(self) -> None:
        """The first value is published, an identical one is not."""
        f = ChangeFilter()
        assert f.passes("v", 230.0, 0.0, None, None)
        assert not f.passes("v", 230.0, 1.0, None, None)

    def test_deadband_measured_from_last_published(self) -> None:
        """Small steps under the deadband add up until they cross it."""
        f = ChangeFilter()
        assert f.passes("v", 230.0, 0, 0.5, None)
        assert not f.passes("v", 230.3, 1, 0.5, None)
        assert f.passes("v", 230.6, 2, 0.5, None)
        assert not f.passes("v", 230.9, 3, 0.5, None)

    def test_heartbeat_republishes_unchanged_value(self) -> None:
        """After `heartbeat` seconds an unchanged value is published anyway."""
        f = ChangeFilter()
        assert f.passes("v", 1, 0.0, None, 60.0)
        assert not f.passes("v", 1, 59.0, None, 60.0)
        assert f.passes("v", 1, 60.0, None, 60.0)

    def test_any_change_of_non_numbers(self) -> None:
        """Bools and strings publish on any change, deadband or not."""
        f = ChangeFilter()
        assert f.passes("s", "stopped", 0, 5.0, None)
        assert f.passes("s", "running", 1, 5.0, None)
        assert f.passes("b", False, 0, 5.0, None)
        assert f.passes("b", True, 1, 5.0, None)

    def test_forget_republishes(self) -> None:
        """After forget (device came back) the next value passes even if unchanged."""
        f = ChangeFilter()
        f.passes("v", 1, 0, None, None)
        f.forget("v")
        assert f.passes("v", 1, 1, None, None)
