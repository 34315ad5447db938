"""The one check of a number of seconds, shared by every call that takes one.

Private (`bridgecancel._util.check_seconds`): a helper with no public surface, tested
for the messages every public call gives (test_blocking.py, test_processes.py and
test_threads.py check a few of them through the public calls).
"""

from __future__ import annotations

import math

import pytest

from bridgecancel._util import check_seconds


def test_infinity_is_accepted_as_itself_everywhere() -> None:
    assert check_seconds(math.inf, "f", "timeout") == math.inf
    assert check_seconds(math.inf, "f", "timeout", none="for no limit") == math.inf
    assert check_seconds(math.inf, "f", "seconds", negative=True) == math.inf


def test_numbers_come_back_as_floats() -> None:
    value = check_seconds(3, "f", "timeout")
    assert value == 3.0
    assert type(value) is float


@pytest.mark.parametrize("value", ["1", True, None, [1.0]])
def test_a_non_number_is_a_type_error_naming_the_call_and_argument(value: object) -> None:
    with pytest.raises(TypeError, match=r"f\(\) grace must be a number of seconds, got"):
        check_seconds(value, "f", "grace")
    with pytest.raises(TypeError, match="number of seconds or None"):
        check_seconds(value, "f", "grace", none="to skip that stage")


def test_nan_is_refused_and_the_message_says_what_infinity_means() -> None:
    with pytest.raises(ValueError, match=r"got NaN \(math\.inf means no limit\)"):
        check_seconds(math.nan, "f", "timeout", negative=True)


def test_negative_is_refused_unless_allowed() -> None:
    with pytest.raises(ValueError, match=r"non-negative number of seconds \(or None to wait"):
        check_seconds(-1, "f", "timeout", none="to wait")
    assert check_seconds(-1, "f", "seconds", negative=True) == -1.0
