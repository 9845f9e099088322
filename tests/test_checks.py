"""loramix.checks: argument checks whose errors name the option."""

from __future__ import annotations

import math

import pytest

from loramix.checks import check_int, check_number, is_int
from loramix.config import ConfigError


def test_is_int_excludes_bools_and_floats():
    assert is_int(3) and is_int(-1) and not is_int(True) and not is_int(3.0) and not is_int("3")


@pytest.mark.parametrize("value", [0, -2, 1.5, True, "4", None])
def test_check_int_refuses_and_names_the_option(value):
    with pytest.raises(ConfigError, match=r"^limit: must be an int >= 1, got "):
        check_int("limit", value)


def test_check_int_bounds_and_optional():
    check_int("seed", -7, None)
    check_int("steps", 0, 0)
    check_int("limit", None, optional=True)
    with pytest.raises(ConfigError, match=r"limit: must be an int >= 1 or None, got 0"):
        check_int("limit", 0, optional=True)


@pytest.mark.parametrize(("kwargs", "bad", "message"), [
    ({"low": 0.0, "high": 1.0, "low_open": True}, 0.0, r"top_p: must be a number in \(0.0, 1.0\], got 0.0"),
    ({"low": 0.0, "high": 1.0, "high_open": True}, 1.0, r"top_p: must be a number in \[0.0, 1.0\), got 1.0"),
    ({"low": 0.0}, -0.5, r"top_p: must be a number >= 0.0, got -0.5"),
    ({"high": 2.0, "high_open": True}, 2.0, r"top_p: must be a number < 2.0, got 2.0"),
    ({}, math.nan, r"top_p: must be a number, got nan"),
    ({}, math.inf, r"top_p: must be a number, got inf"),
    ({}, True, r"top_p: must be a number, got True"),
])
def test_check_number_refuses_values_outside_open_or_closed_bounds(kwargs, bad, message):
    with pytest.raises(ConfigError, match=message):
        check_number("top_p", bad, **kwargs)


def test_check_number_accepts_ints_floats_and_optional_none():
    check_number("top_p", 1, 0.0, 1.0, low_open=True)
    check_number("top_p", 0.5, 0.0, 1.0, low_open=True, high_open=True)
    check_number("temperature", None, 0.0, optional=True)
