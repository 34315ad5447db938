"""The CPython-internals probe of `bridgecancel.blocking`, and the fallback when it fails.

Private (`bridgecancel.blocking._condition` and `_sync`): the probe and the switch to
sliced waits happen at import, with no public surface; the tests break the internals
on purpose and check that every public wait still keeps its promises.
"""

from __future__ import annotations

import concurrent.futures
import math
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from _blocking_harness import (
    HARNESSES,
    PROMPT,
    Worker,
    wait_blocked,
)
from bridgecancel import CancelSource, CancelToken, blocking
from bridgecancel.blocking import _condition as _cpython
from bridgecancel.blocking import _sync as _blocking_sync

# -- the probe --------------------------------------------------------------------------


def test_the_probe_passes_on_this_cpython() -> None:
    assert _cpython._probe() is True
    assert _cpython.AVAILABLE is True


def _without(cls: type[Any], attribute: str) -> type:
    """A subclass of `cls` whose instances lack the attribute `__init__` gives them."""

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        cls.__init__(self, *args, **kwargs)
        delattr(self, attribute)

    return type(cls.__name__, (cls,), {"__init__": __init__})


def _break(internal: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make one of the internals `_cpython` relies on missing or wrong."""
    if internal == "Condition._waiters":
        waiters_list = type("Condition", (threading.Condition,), {})
        original = threading.Condition.__init__

        def init(self: Any, lock: Any = None) -> None:
            original(self, lock)
            self._waiters = list(self._waiters)

        waiters_list.__init__ = init  # type: ignore[misc]
        monkeypatch.setattr(threading, "Condition", waiters_list)
    elif internal in ("Condition._release_save", "Condition._acquire_restore"):
        monkeypatch.delattr(threading.Condition, internal.split(".")[1])
        monkeypatch.setattr(threading, "RLock", threading.Lock)  # no copies from an RLock
    elif internal == "Condition._is_owned":
        monkeypatch.setattr(threading.Condition, "_is_owned", lambda self: False)
        monkeypatch.setattr(threading, "RLock", threading.Lock)
    elif internal == "Event._cond":
        monkeypatch.setattr(threading, "Event", _without(threading.Event, "_cond"))
    elif internal == "Semaphore._cond":
        monkeypatch.setattr(threading, "Semaphore", _without(threading.Semaphore, "_cond"))
    elif internal == "Semaphore._value":
        monkeypatch.setattr(threading, "Semaphore", _without(threading.Semaphore, "_value"))
    elif internal == "Queue._qsize":
        monkeypatch.delattr(queue.Queue, "_qsize")
    elif internal == "Queue.not_empty":
        monkeypatch.setattr(queue, "Queue", _without(queue.Queue, "not_empty"))
    elif internal == "Future._condition":
        future = _without(concurrent.futures.Future, "_condition")
        monkeypatch.setattr(concurrent.futures, "Future", future)
    else:  # pragma: no cover - a typo in the parameters
        raise AssertionError(internal)


INTERNALS = [
    "Condition._waiters",
    "Condition._release_save",
    "Condition._acquire_restore",
    "Condition._is_owned",
    "Event._cond",
    "Semaphore._cond",
    "Semaphore._value",
    "Queue._qsize",
    "Queue.not_empty",
    "Future._condition",
]


@pytest.mark.parametrize("internal", INTERNALS)
def test_the_probe_fails_when_any_internal_is_missing(
    internal: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as patch:
        _break(internal, patch)
        assert _cpython._probe() is False
    assert _cpython._probe() is True


@pytest.fixture
def probe_failed(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """`_cpython.AVAILABLE` as the probe leaves it where an internal is missing.

    Returns the deadlines the sync waits' sliced loop was entered with, as they come.
    """
    with monkeypatch.context() as patch:
        _break("Condition._waiters", patch)
        available = _cpython._probe()
    assert available is False
    monkeypatch.setattr(_cpython, "AVAILABLE", available)
    entered: list[float] = []
    sliced: Callable[[Callable[[float], bool], CancelToken, float | None], bool]
    sliced = vars(_blocking_sync)["wait_sliced"]  # the one the sync waits call

    def spy(attempt: Callable[[float], bool], token: CancelToken, deadline: float | None) -> bool:
        entered.append(math.inf if deadline is None else deadline)
        return sliced(attempt, token, deadline)

    monkeypatch.setattr(_blocking_sync, "wait_sliced", spy)
    return entered


@pytest.mark.parametrize(
    "name",
    [
        "event",
        "condition",
        "semaphore",
        "bounded_semaphore",
        "queue_get",
        "queue_put",
        "lifo_queue_get",
        "future",
    ],
)
def test_condition_waits_fall_back_to_slices(name: str, probe_failed: list[float]) -> None:
    # Where the internals are not as expected, waits poll in POLL_SLICE slices with the
    # same semantics.
    harness = HARNESSES[name]()
    try:
        source = CancelSource()
        worker = Worker(lambda: harness.block(source.token))
        wait_blocked(worker.thread)
        cancelled_at = time.perf_counter()
        source.cancel()
        worker.cancelled(source.token)
        assert worker.ended_at - cancelled_at < PROMPT
        harness.assert_unchanged()
        harness.timeout_call(CancelSource().token)
        worker = Worker(lambda: harness.block(CancelSource().token))
        wait_blocked(worker.thread)
        harness.make_ready()
        worker.join(10)
        assert worker.error is None
        harness.check_result(worker.result)
        assert len(probe_failed) >= 3  # every wait went through the sliced loop
    finally:
        harness.close()


@pytest.mark.usefixtures("probe_failed")
def test_wait_condition_still_needs_the_lock_when_the_probe_fails() -> None:
    with pytest.raises(RuntimeError, match="inside `with cond:`"):
        blocking.wait_condition(threading.Condition(), bool, token=CancelSource().token)
    cond = threading.Condition()
    with cond:
        assert blocking.wait_condition(cond, lambda: 1, token=CancelSource().token) == 1
