"""The opening every `bridgecancel.blocking` wait shares, and the one sliced wait.

Private (`bridgecancel.blocking._common`): `begin` and `wait_sliced` are the parts every
wait is built from and have no public surface; what users see of them (the token, the
timeout check, the slices) is tested through `bridgecancel.blocking` in test_blocking.py.
"""

from __future__ import annotations

import math
import time

import pytest

from bridgecancel import Cancelled, CancelSource, current_token
from bridgecancel.blocking._common import POLL_SLICE, begin, check_seconds, wait_sliced


def test_begin_takes_the_current_token_and_marks_one_that_never_fires() -> None:
    token, deadline, never = begin("caller", None)
    assert token is current_token()
    assert deadline is None
    assert never


def test_begin_works_out_the_deadline_and_checks_the_token() -> None:
    source = CancelSource()
    before = time.monotonic()
    token, deadline, never = begin("caller", source.token, 2.5)
    assert token is source.token
    assert deadline is not None
    assert before + 2.5 <= deadline <= time.monotonic() + 2.5
    assert not never
    source.cancel("stop")
    with pytest.raises(Cancelled, match="stop"):
        begin("caller", source.token)
    assert begin("caller", source.token, check=False).token is source.token


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (-1, ValueError, "non-negative"),
        (math.nan, ValueError, "non-negative"),
        ("1", TypeError, "number of seconds"),
        (True, TypeError, "number of seconds"),
    ],
)
def test_seconds_are_checked_once_for_every_caller(
    value: object, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=f"caller\\(\\) grace must be a {match}"):
        check_seconds(value, "caller", "grace")
    assert check_seconds(math.inf, "caller", "grace") == math.inf
    assert check_seconds(0, "caller", "grace") == 0.0


def test_wait_sliced_returns_when_the_attempt_succeeds() -> None:
    slices: list[float] = []

    def attempt(seconds: float) -> bool:
        slices.append(seconds)
        return len(slices) == 3

    assert wait_sliced(attempt, CancelSource().token, None)
    assert slices == [POLL_SLICE] * 3


def test_wait_sliced_gives_up_at_the_deadline_with_a_last_short_slice() -> None:
    slices: list[float] = []

    def attempt(seconds: float) -> bool:
        slices.append(seconds)
        time.sleep(seconds)
        return False

    assert not wait_sliced(attempt, CancelSource().token, time.monotonic() + 0.035)
    assert all(s <= POLL_SLICE for s in slices)
    assert 3 <= len(slices) <= 6


def test_wait_sliced_raises_once_the_token_fires_between_slices() -> None:
    source = CancelSource()

    def attempt(seconds: float) -> bool:
        source.cancel("enough")
        return False

    with pytest.raises(Cancelled, match="enough") as info:
        wait_sliced(attempt, source.token, None)
    assert info.value.token is source.token
