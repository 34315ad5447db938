"""`Cancelled` and `BrokenWorkerError`: what callers catch."""

from __future__ import annotations

import copy
import pickle
from typing import Any

import pytest

from bridgecancel import BrokenWorkerError, Cancelled, CancelSource


def _cancelled(reason: str | None = "stop") -> Cancelled:
    source = CancelSource()
    source.cancel(reason)
    with pytest.raises(Cancelled) as excinfo:
        source.token.check()
    return excinfo.value


def test_cancelled_is_a_base_exception_not_an_exception() -> None:
    assert issubclass(Cancelled, BaseException)
    assert not issubclass(Cancelled, Exception)


def test_except_exception_does_not_swallow_cancelled() -> None:
    source = CancelSource()
    source.cancel()

    def user_code() -> str:
        try:
            source.token.check()
        except Exception:
            return "swallowed"
        return "not cancelled"

    with pytest.raises(Cancelled):
        user_code()


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [((), {}), ((None, "reason"), {}), ((), {"token": None, "reason": "r"})],
)
def test_cancelled_has_no_public_constructor(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    with pytest.raises(TypeError, match=r"no public constructor.*token\.check\(\)"):
        Cancelled(*args, **kwargs)


def test_cancelled_carries_token_and_reason() -> None:
    source = CancelSource()
    source.cancel("user pressed stop")
    with pytest.raises(Cancelled) as excinfo:
        source.token.check()
    assert excinfo.value.token is source.token
    assert excinfo.value.reason == "user pressed stop"
    assert str(excinfo.value) == "user pressed stop"


def test_cancelled_without_reason_says_cancelled() -> None:
    exc = _cancelled(None)
    assert exc.reason is None
    assert str(exc) == "cancelled"


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
@pytest.mark.parametrize("reason", ["deadline exceeded", None])
def test_cancelled_pickles_keeping_reason(protocol: int, reason: str | None) -> None:
    copied = pickle.loads(pickle.dumps(_cancelled(reason), protocol=protocol))
    assert type(copied) is Cancelled
    assert copied.reason == reason
    # A token belongs to one process: the copy does not carry it.
    assert copied.token is None
    assert str(copied) == (reason if reason is not None else "cancelled")


def test_cancelled_copies_keeping_reason() -> None:
    copied = copy.copy(_cancelled("why"))
    assert type(copied) is Cancelled
    assert copied.reason == "why"


def test_broken_worker_error_is_a_runtime_error_with_details() -> None:
    exc = BrokenWorkerError("worker died", exitcode=3)
    assert isinstance(exc, RuntimeError)
    assert str(exc) == "worker died"
    assert exc.exitcode == 3
    assert exc.signal is None
    by_signal = BrokenWorkerError("worker killed", signal=9)
    assert by_signal.exitcode is None
    assert by_signal.signal == 9


def test_broken_worker_error_pickles_keeping_details() -> None:
    copied = pickle.loads(pickle.dumps(BrokenWorkerError("gone", exitcode=None, signal=15)))
    assert type(copied) is BrokenWorkerError
    assert str(copied) == "gone"
    assert copied.exitcode is None
    assert copied.signal == 15
