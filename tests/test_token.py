"""Tokens: sources, tokens, callbacks, children, deadlines.

Through the public API, except where there is none: the tests look at the deadline
timer's pending entries (`bridgecancel._timer`) to show a token leaves nothing behind,
make a token current in a context by hand (`bridgecancel._tokens._current`, until
`use_token` is public), and the last section tests the token internals the bridge relies
on (`_cancel_detached`, `_on_cancel_inline`, `informative_source`), which users never call.
"""

from __future__ import annotations

import collections
import contextvars
import gc
import math
import os
import select
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup, ExceptionGroup

import bridgecancel
from bridgecancel import (
    Cancelled,
    CancelSource,
    CancelToken,
    Registration,
    _timer,
    _tokens,
    any_of,
    check_cancelled,
    current_token,
)

TIMER_NAME = "bridgecancel deadline timer"
# Generous: the machine is shared; these bound "promptly", they do not measure speed.
PROMPT = 0.5
# How long a test waits for something that should happen; never reached when it works.
PATIENCE = 5.0


# -- helpers --------------------------------------------------------------------------


def _timer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == TIMER_NAME]


def _assert_no_timer_thread() -> None:
    """The timer thread has ended (it may still be returning when this is called)."""
    for thread in _timer_threads():
        thread.join(PATIENCE)
    assert _timer_threads() == []
    assert _timer.timer.pending() == 0


def _in_thread(fn: Callable[[], object]) -> threading.Thread:
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    return thread


def _join(thread: threading.Thread) -> None:
    thread.join(PATIENCE)
    assert not thread.is_alive(), "thread did not finish: deadlock?"


def _callbacks(token: CancelToken) -> dict[Registration, int]:
    callbacks = token._callbacks
    assert callbacks is not None
    return callbacks


@pytest.fixture
def unraisable(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Collect what reaches `sys.unraisablehook`."""
    seen: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    return seen


@pytest.fixture
def no_timer() -> None:
    """Start with no deadline pending (an earlier test's timer may still be ending)."""
    _assert_no_timer_thread()


# -- source and token basics ----------------------------------------------------------


def test_token_is_the_same_object_every_time() -> None:
    source = CancelSource()
    assert isinstance(source.token, CancelToken)
    assert source.token is source.token


def test_new_source_is_not_cancelled() -> None:
    source = CancelSource()
    token = source.token
    assert source.cancel_called is False
    assert token.cancel_called is False
    assert token.reason is None
    assert source.deadline == token.deadline == math.inf
    assert token.remaining() == math.inf
    token.check()
    assert token.wait(0) is False


def test_cancel_fires_the_token() -> None:
    source = CancelSource()
    source.cancel("stop")
    assert source.cancel_called is True
    assert source.token.cancel_called is True
    assert source.token.reason == "stop"


def test_cancel_without_reason_leaves_reason_none() -> None:
    source = CancelSource()
    source.cancel()
    assert source.token.cancel_called is True
    assert source.token.reason is None


def test_cancel_is_idempotent_and_the_first_reason_wins() -> None:
    source = CancelSource()
    calls: list[str | None] = []
    source.token.on_cancel(lambda: calls.append(source.token.reason))
    source.cancel("first")
    source.cancel("second")
    source.cancel()
    assert source.token.reason == "first"
    assert calls == ["first"]


def test_concurrent_cancels_fire_once_with_one_reason(busy_switching: None) -> None:
    rounds, n_threads = 50, 8
    sources = [CancelSource() for _ in range(rounds)]
    seen: list[list[str | None]] = [[] for _ in range(rounds)]
    for source, reasons in zip(sources, seen, strict=True):
        source.token.on_cancel(_append_reason, reasons, source.token)

    def work(r: int, w: int) -> None:
        sources[r].cancel(f"thread {w}")

    _rounds(n_threads, rounds, work)
    for source, reasons in zip(sources, seen, strict=True):
        assert len(reasons) == 1
        assert reasons[0] == source.token.reason
        assert source.token.reason in {f"thread {w}" for w in range(n_threads)}


def _append_reason(reasons: list[str | None], token: CancelToken) -> None:
    reasons.append(token.reason)


def test_cancel_called_never_goes_back() -> None:
    source = CancelSource(deadline=time.monotonic() + 100)
    source.cancel("done")
    source.deadline = math.inf
    source.cancel_after(100)
    source.close()
    source.cancel("again")
    assert source.token.cancel_called is True
    assert source.cancel_called is True
    assert source.token.reason == "done"


def test_repr_says_what_state_the_token_is_in() -> None:
    source = CancelSource()
    assert "pending" in repr(source.token)
    assert "pending" in repr(source)
    source.cancel("why")
    assert "cancelled" in repr(source.token)
    assert "'why'" in repr(source.token)
    assert "never cancelled" in repr(current_token())


# -- deadlines ------------------------------------------------------------------------


def test_deadline_is_settable() -> None:
    start = time.monotonic()
    with CancelSource(deadline=start + 100) as source:
        assert source.deadline == source.token.deadline == start + 100
        source.deadline = start + 200
        assert source.deadline == source.token.deadline == start + 200
        source.deadline = math.inf
        assert source.token.deadline == math.inf
        assert source.token.remaining() == math.inf
    assert not source.cancel_called


def test_deadline_accepts_an_int() -> None:
    with CancelSource(deadline=int(time.monotonic()) + 100) as source:
        assert isinstance(source.deadline, float)
        assert not source.cancel_called


def test_cancel_after_sets_the_deadline_from_now() -> None:
    with CancelSource() as source:
        before = time.monotonic()
        source.cancel_after(100)
        after = time.monotonic()
        assert before + 100 <= source.deadline <= after + 100
        source.cancel_after(math.inf)
        assert source.deadline == math.inf


def _set_deadline(source: CancelSource, value: Any) -> None:
    source.deadline = value


_DEADLINE_SETTERS: dict[str, Callable[[Any], object]] = {
    "constructor": lambda value: CancelSource(deadline=value),
    "setter": lambda value: _set_deadline(CancelSource(), value),
    "cancel_after": lambda value: CancelSource().cancel_after(value),
    "child": lambda value: CancelSource().token.child(deadline=value),
}


@pytest.mark.parametrize("setter", _DEADLINE_SETTERS.values(), ids=_DEADLINE_SETTERS.keys())
def test_nan_deadline_is_a_value_error_saying_what_to_pass(
    setter: Callable[[Any], object],
) -> None:
    with pytest.raises(ValueError, match=r"NaN.*math\.inf"):
        setter(math.nan)


@pytest.mark.parametrize("setter", _DEADLINE_SETTERS.values(), ids=_DEADLINE_SETTERS.keys())
@pytest.mark.parametrize("value", ["10", None, True, [1.0]])
def test_non_number_deadline_is_a_type_error(
    setter: Callable[[Any], object], value: object
) -> None:
    with pytest.raises(TypeError, match=repr(value).replace("[", r"\[")):
        setter(value)


def test_nan_cancel_after_talks_about_seconds() -> None:
    with pytest.raises(ValueError, match="seconds"):
        CancelSource().cancel_after(math.nan)


def test_past_deadline_fires_at_once(no_timer: None) -> None:
    source = CancelSource(deadline=time.monotonic() - 1)
    assert source.token.cancel_called is True
    assert source.token.reason == "deadline exceeded"
    assert source.token.remaining() == 0.0
    _assert_no_timer_thread()


@pytest.mark.parametrize("seconds", [0, -5])
def test_cancel_after_zero_or_less_fires_at_once(seconds: float) -> None:
    source = CancelSource()
    source.cancel_after(seconds)
    assert source.token.cancel_called is True
    assert source.token.reason == "deadline exceeded"


def test_setting_a_past_deadline_fires_and_reports_callback_errors(
    unraisable: list[Any],
) -> None:
    source = CancelSource()
    error = ValueError("boom")

    def fail() -> None:
        raise error

    source.token.on_cancel(fail)
    source.deadline = time.monotonic() - 1  # must not raise: nobody asked to cancel
    assert source.token.reason == "deadline exceeded"
    assert [hook_arg.exc_value for hook_arg in unraisable] == [error]


def test_passing_deadline_fires_the_token_by_itself() -> None:
    source = CancelSource(deadline=time.monotonic() + 0.05)
    assert source.token.wait(PATIENCE) is True
    assert source.token.cancel_called is True
    assert source.cancel_called is True
    assert source.token.reason == "deadline exceeded"
    assert source.token.remaining() == 0.0
    with pytest.raises(Cancelled) as excinfo:
        source.token.check()
    assert excinfo.value.reason == "deadline exceeded"
    _assert_no_timer_thread()


def test_deadline_callbacks_run_in_the_timer_thread() -> None:
    source = CancelSource(deadline=time.monotonic() + 0.05)
    ran_in: list[str] = []
    ran = threading.Event()

    def callback() -> None:
        ran_in.append(threading.current_thread().name)
        ran.set()

    source.token.on_cancel(callback)
    assert ran.wait(PATIENCE)
    assert ran_in == [TIMER_NAME]


def test_deadline_callback_errors_go_to_unraisablehook(unraisable: list[Any]) -> None:
    source = CancelSource()
    errors = [ValueError("first"), KeyError("second")]
    ok = threading.Event()

    def fail(exc: BaseException) -> None:
        raise exc

    for exc in errors:
        source.token.on_cancel(fail, exc)
    source.token.on_cancel(ok.set)  # newest first: runs before the failing ones
    source.cancel_after(0.05)
    assert source.token.wait(PATIENCE)
    for thread in _timer_threads():  # reporting ends before the thread does
        thread.join(PATIENCE)
    assert ok.is_set()
    assert [hook_arg.exc_value for hook_arg in unraisable] == errors[::-1]
    for hook_arg in unraisable:
        assert hook_arg.exc_type is type(hook_arg.exc_value)
        assert hook_arg.exc_traceback is hook_arg.exc_value.__traceback__
        assert "on_cancel" in hook_arg.err_msg
        assert hook_arg.object is source.token


def test_default_unraisablehook_prints_deadline_callback_errors(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)
    source = CancelSource()

    def fail() -> None:
        raise ValueError("printed")

    source.token.on_cancel(fail)
    source.cancel_after(0.05)
    assert source.token.wait(PATIENCE)
    _assert_no_timer_thread()
    err = capsys.readouterr().err
    assert "on_cancel" in err
    assert "ValueError: printed" in err


def test_failing_unraisablehook_does_not_stop_later_deadlines(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    called = threading.Event()

    def broken_hook(_: object) -> None:
        called.set()
        raise RuntimeError("hook is broken")

    monkeypatch.setattr(sys, "unraisablehook", broken_hook)
    first = CancelSource()

    def fail() -> None:
        raise ValueError("from callback")

    first.token.on_cancel(fail)
    first.cancel_after(0.02)
    assert called.wait(PATIENCE)
    # The timer thread survived: the next deadline still fires by itself.
    second = CancelSource(deadline=time.monotonic() + 0.02)
    assert second.token.wait(PATIENCE) is True
    _assert_no_timer_thread()
    err = capsys.readouterr().err
    assert "RuntimeError: hook is broken" in err
    assert "ValueError: from callback" in err


def test_an_earlier_deadline_wakes_the_timer() -> None:
    late = CancelSource(deadline=time.monotonic() + 100)
    soon = CancelSource(deadline=time.monotonic() + 0.05)
    assert soon.token.wait(PATIENCE) is True
    assert late.token.cancel_called is False
    late.close()
    _assert_no_timer_thread()


def test_deadline_moved_earlier_fires_at_the_new_time() -> None:
    source = CancelSource(deadline=time.monotonic() + 100)
    source.deadline = time.monotonic() + 0.05
    assert source.token.wait(PATIENCE) is True
    assert source.token.reason == "deadline exceeded"


@pytest.mark.slow
def test_deadline_moved_later_or_removed_does_not_fire_at_the_old_time() -> None:
    start = time.monotonic()
    moved = CancelSource(deadline=start + 0.2)
    removed = CancelSource(deadline=start + 0.2)
    moved.deadline = start + 100
    removed.deadline = math.inf
    witness = CancelSource(deadline=start + 0.3)  # fires after the old deadlines
    assert witness.token.wait(PATIENCE) is True
    assert moved.token.cancel_called is False
    assert removed.token.cancel_called is False
    moved.close()
    _assert_no_timer_thread()


def _end_by_cancel(source: CancelSource) -> None:
    source.cancel()


def _end_by_close(source: CancelSource) -> None:
    source.close()


def _end_by_removing_deadline(source: CancelSource) -> None:
    source.deadline = math.inf


def _end_by_deadline(source: CancelSource) -> None:
    source.deadline = time.monotonic() + 0.02
    assert source.token.wait(PATIENCE)


@pytest.mark.parametrize(
    "end", [_end_by_cancel, _end_by_close, _end_by_removing_deadline, _end_by_deadline]
)
def test_timer_thread_lives_only_while_deadlines_are_pending(
    no_timer: None, end: Callable[[CancelSource], None]
) -> None:
    other = CancelSource(deadline=time.monotonic() + 100)
    source = CancelSource(deadline=time.monotonic() + 100)
    assert len(_timer_threads()) == 1
    assert _timer.timer.pending() == 2
    end(source)
    assert _timer.timer.pending() == 1
    assert len(_timer_threads()) == 1  # `other` still pending
    other.close()
    _assert_no_timer_thread()


def test_timer_thread_ends_when_the_source_is_garbage_collected(no_timer: None) -> None:
    source = CancelSource(deadline=time.monotonic() + 100)
    source.token.on_cancel(print)  # a reference cycle: only the collector frees it
    assert len(_timer_threads()) == 1
    del source
    gc.collect()
    _assert_no_timer_thread()


def test_no_timer_thread_without_deadlines(no_timer: None) -> None:
    source = CancelSource()
    child = source.token.child()
    combined = any_of(source.token, child.token)
    assert _timer_threads() == []
    combined.close()
    child.close()


def test_remaining_counts_down_and_is_never_negative() -> None:
    assert CancelSource().token.remaining() == math.inf
    with CancelSource(deadline=time.monotonic() + 100) as source:
        assert 90 < source.token.remaining() <= 100
    past = CancelSource(deadline=time.monotonic() - 100)
    assert past.token.remaining() == 0.0
    # Also for a deadline that passed after the token was cancelled by hand.
    source = CancelSource()
    source.cancel()
    source.deadline = time.monotonic() - 100
    assert source.token.remaining() == 0.0


# -- check, wait, sleep ---------------------------------------------------------------


def test_check_raises_cancelled_with_token_and_reason() -> None:
    source = CancelSource()
    source.token.check()
    source.cancel("enough")
    with pytest.raises(Cancelled) as excinfo:
        source.token.check()
    assert excinfo.value.token is source.token
    assert excinfo.value.reason == "enough"


def test_wait_times_out_with_false() -> None:
    token = CancelSource().token
    start = time.monotonic()
    assert token.wait(0.02) is False
    assert time.monotonic() - start >= 0.015
    assert token.wait(0) is False
    assert token.wait(-1) is False


def test_wait_on_a_cancelled_token_returns_true_at_once() -> None:
    source = CancelSource()
    source.cancel()
    assert source.token.wait() is True
    assert source.token.wait(0) is True
    assert source.token.wait(math.inf) is True


@pytest.mark.parametrize("timeout", [PATIENCE * 2, None, math.inf, 1e12])
def test_wait_wakes_promptly_when_another_thread_cancels(timeout: float | None) -> None:
    source = CancelSource()
    waiting = threading.Event()
    result: list[tuple[bool, float]] = []

    def waiter() -> None:
        waiting.set()
        woke = source.token.wait(timeout)
        result.append((woke, time.monotonic()))

    thread = _in_thread(waiter)
    assert waiting.wait(PATIENCE)
    time.sleep(0.01)  # let the waiter block (it is correct either way)
    cancelled_at = time.monotonic()
    source.cancel()
    _join(thread)
    [(woke, woke_at)] = result
    assert woke is True
    assert woke_at - cancelled_at < PROMPT


def test_wait_nan_timeout_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="NaN"):
        CancelSource().token.wait(math.nan)


def test_sleep_returns_after_the_time_when_not_cancelled() -> None:
    token = CancelSource().token
    start = time.monotonic()
    token.sleep(0.02)
    assert time.monotonic() - start >= 0.015
    token.sleep(0)


@pytest.mark.parametrize("seconds", [PATIENCE * 2, math.inf])
def test_sleep_raises_cancelled_promptly_when_another_thread_cancels(seconds: float) -> None:
    source = CancelSource()
    sleeping = threading.Event()
    raised: list[tuple[Cancelled, float]] = []

    def sleeper() -> None:
        sleeping.set()
        try:
            source.token.sleep(seconds)
        except Cancelled as exc:
            raised.append((exc, time.monotonic()))

    thread = _in_thread(sleeper)
    assert sleeping.wait(PATIENCE)
    time.sleep(0.01)
    cancelled_at = time.monotonic()
    source.cancel("wake up")
    _join(thread)
    [(exc, raised_at)] = raised
    assert exc.token is source.token
    assert exc.reason == "wake up"
    assert raised_at - cancelled_at < PROMPT


def test_sleep_for_the_remaining_time_without_a_deadline_waits_for_cancel() -> None:
    # remaining() is math.inf without a deadline: sleeping or waiting that long must
    # block until the token fires (here, a child's own deadline), not overflow.
    parent = CancelSource()
    child = parent.token.child(deadline=time.monotonic() + 0.05)
    with pytest.raises(Cancelled, match="deadline exceeded"):
        child.token.sleep(parent.token.remaining())
    with CancelSource(deadline=time.monotonic() + 0.05) as source:
        assert source.token.wait(math.inf) is True


def test_sleep_on_a_cancelled_token_raises_even_for_zero_seconds() -> None:
    source = CancelSource()
    source.cancel("already")
    with pytest.raises(Cancelled, match="already"):
        source.token.sleep(0)


@pytest.mark.parametrize("seconds", [-1, math.nan])
def test_sleep_rejects_negative_and_nan(seconds: float) -> None:
    with pytest.raises(ValueError, match="non-negative"):
        CancelSource().token.sleep(seconds)


# -- on_cancel ------------------------------------------------------------------------


def test_callback_runs_once_with_its_arguments() -> None:
    source = CancelSource()
    calls: list[tuple[int, str]] = []
    source.token.on_cancel(lambda a, b: calls.append((a, b)), 1, "two")
    assert calls == []
    source.cancel()
    source.cancel()
    assert calls == [(1, "two")]


def test_callback_runs_in_the_cancelling_thread() -> None:
    source = CancelSource()
    ran_in: list[int] = []
    source.token.on_cancel(lambda: ran_in.append(threading.get_ident()))
    thread = _in_thread(source.cancel)
    _join(thread)
    assert ran_in == [thread.ident]


def test_callbacks_run_newest_first() -> None:
    source = CancelSource()
    order: list[int] = []
    for i in range(5):
        source.token.on_cancel(order.append, i)
    source.cancel()
    assert order == [4, 3, 2, 1, 0]


def test_callback_on_a_cancelled_token_runs_at_once_in_the_caller() -> None:
    source = CancelSource()
    source.cancel()
    ran_in: list[int] = []
    registration = source.token.on_cancel(lambda: ran_in.append(threading.get_ident()))
    assert ran_in == [threading.get_ident()]
    assert isinstance(registration, Registration)
    assert registration.unregister() is False


def test_error_from_a_callback_run_at_once_reaches_the_caller() -> None:
    source = CancelSource()
    source.cancel()

    def fail() -> None:
        raise ValueError("now")

    with pytest.raises(ValueError, match="now"):
        source.token.on_cancel(fail)


def test_callbacks_run_outside_any_lock() -> None:
    source = CancelSource()
    token = source.token
    other = CancelSource()
    seen: dict[str, object] = {}
    nested: list[str] = []

    def callback() -> None:
        seen["reason"] = token.reason
        seen["waited"] = token.wait(0)
        try:
            token.check()
        except Cancelled:
            seen["checked"] = True
        token.on_cancel(nested.append, "registered inside")  # runs at once
        with token.child() as child:
            seen["child cancelled"] = child.cancel_called
        other.cancel("from callback")
        source.cancel("again")  # reentrant: a no-op, not a deadlock
        with CancelSource(deadline=time.monotonic() + 100):  # the timer lock is free too
            pass
        select.select([token.fileno()], [], [], 0)

    token.on_cancel(callback)
    thread = _in_thread(lambda: source.cancel("first"))
    _join(thread)
    assert seen == {
        "reason": "first",
        "waited": True,
        "checked": True,
        "child cancelled": True,
    }
    assert nested == ["registered inside"]
    assert other.token.reason == "from callback"


def test_callbacks_cancelling_each_other_do_not_deadlock() -> None:
    a, b = CancelSource(), CancelSource()
    a.token.on_cancel(b.cancel, "from a")
    b.token.on_cancel(a.cancel, "from b")
    thread = _in_thread(lambda: a.cancel("start"))
    _join(thread)
    assert a.token.reason == "start"
    assert b.token.reason == "from a"


def test_all_callbacks_run_and_errors_surface_together() -> None:
    source = CancelSource()
    errors = [ValueError("one"), KeyError("two")]
    ran: list[str] = []

    def fail(exc: BaseException) -> None:
        raise exc

    source.token.on_cancel(ran.append, "oldest")
    source.token.on_cancel(fail, errors[0])
    source.token.on_cancel(ran.append, "middle")
    source.token.on_cancel(fail, errors[1])
    source.token.on_cancel(ran.append, "newest")
    with pytest.raises(ExceptionGroup) as excinfo:
        source.cancel()
    assert ran == ["newest", "middle", "oldest"]
    assert list(excinfo.value.exceptions) == errors[::-1]
    assert source.token.cancel_called is True
    source.cancel()  # the callbacks ran once: nothing to raise again


def test_base_exceptions_from_callbacks_surface_as_a_base_exception_group() -> None:
    class Stop(BaseException):
        pass

    source = CancelSource()
    ran: list[str] = []
    stop = Stop()

    def fail() -> None:
        raise stop

    source.token.on_cancel(ran.append, "after")
    source.token.on_cancel(fail)
    with pytest.raises(BaseExceptionGroup) as excinfo:
        source.cancel()
    assert not isinstance(excinfo.value, ExceptionGroup)
    assert list(excinfo.value.exceptions) == [stop]
    assert ran == ["after"]


@pytest.mark.parametrize("not_callable", [None, "print", 42])
def test_on_cancel_rejects_a_non_callable(not_callable: Any) -> None:
    source = CancelSource()
    with pytest.raises(TypeError, match="callable"):
        source.token.on_cancel(not_callable)
    assert _callbacks(source.token) == {}


def test_on_cancel_rejects_a_source_as_callback() -> None:
    source = CancelSource()
    with pytest.raises(TypeError, match="callable"):
        source.token.on_cancel(CancelSource())  # type: ignore[arg-type]


# -- Registration ---------------------------------------------------------------------


def test_unregister_before_cancel_stops_the_callback() -> None:
    source = CancelSource()
    calls: list[int] = []
    registration = source.token.on_cancel(calls.append, 1)
    assert len(_callbacks(source.token)) == 1
    assert registration.unregister() is True
    assert _callbacks(source.token) == {}
    assert registration.unregister() is False
    source.cancel()
    assert calls == []


def test_unregister_after_the_callback_ran_is_false() -> None:
    source = CancelSource()
    registration = source.token.on_cancel(lambda: None)
    source.cancel()
    assert registration.unregister() is False


def test_unregister_while_the_callback_runs_is_false() -> None:
    source = CancelSource()
    running, release = threading.Event(), threading.Event()
    finished: list[bool] = []

    def slow() -> None:
        running.set()
        release.wait(PATIENCE)
        finished.append(True)

    registration = source.token.on_cancel(slow)
    thread = _in_thread(source.cancel)
    assert running.wait(PATIENCE)
    try:
        assert registration.unregister() is False
    finally:
        release.set()
        _join(thread)
    assert finished == [True]


def test_registration_as_context_manager_unregisters_on_exit() -> None:
    source = CancelSource()
    calls: list[str] = []
    with source.token.on_cancel(calls.append, "inside") as registration:
        assert isinstance(registration, Registration)
        assert len(_callbacks(source.token)) == 1
    assert _callbacks(source.token) == {}
    source.cancel()
    assert calls == []


def test_registration_context_manager_lets_the_callback_run_inside() -> None:
    source = CancelSource()
    calls: list[str] = []
    with source.token.on_cancel(calls.append, "ran"):
        source.cancel()
    assert calls == ["ran"]


def test_registration_context_manager_unregisters_on_error() -> None:
    source = CancelSource()
    calls: list[str] = []
    with pytest.raises(ZeroDivisionError), source.token.on_cancel(calls.append, "x"):
        1 / 0  # noqa: B018
    source.cancel()
    assert calls == []


# -- races ----------------------------------------------------------------------------


@pytest.fixture
def busy_switching() -> Iterator[None]:
    """Make the interpreter switch threads very often, so races show in few rounds."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(interval)


def _rounds(n_workers: int, rounds: int, work: Callable[[int, int], None]) -> None:
    """Run `work(round, worker)` in `n_workers` threads, released together each round."""
    start = threading.Barrier(n_workers + 1)
    done = threading.Barrier(n_workers + 1)
    errors: list[BaseException] = []

    def worker(w: int) -> None:
        for r in range(rounds):
            start.wait(PATIENCE)
            try:
                work(r, w)
            except BaseException as exc:
                errors.append(exc)
            done.wait(PATIENCE)

    threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(n_workers)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(rounds):
            start.wait(PATIENCE)
            done.wait(PATIENCE)
    finally:
        for thread in threads:
            _join(thread)
    assert errors == []


def _record(log: list[tuple[int, int]], key: int) -> None:
    log.append((key, threading.get_ident()))


@pytest.mark.slow
def test_register_versus_cancel_loses_no_callback_and_runs_none_twice(
    busy_switching: None,
) -> None:
    rounds, registrars, per_thread = 200, 4, 40
    sources = [CancelSource() for _ in range(rounds)]
    halfway = [threading.Event() for _ in range(rounds)]
    ran: list[list[tuple[int, int]]] = [[] for _ in range(rounds)]
    cancellers: list[int] = []

    def work(r: int, w: int) -> None:
        source = sources[r]
        if w == registrars:  # the last worker cancels while the others register
            cancellers.append(threading.get_ident())
            assert halfway[r].wait(PATIENCE)
            source.cancel()
            return
        for i in range(per_thread):
            source.token.on_cancel(_record, ran[r], w * per_thread + i)
            if i == per_thread // 2:
                halfway[r].set()

    _rounds(registrars + 1, rounds, work)
    expected = collections.Counter(range(registrars * per_thread))
    for r in range(rounds):
        assert collections.Counter(key for key, _ in ran[r]) == expected, f"round {r}"
    # Both sides of the race happened: callbacks run by the cancel, and callbacks
    # registered after it (run at once by their registrar).
    threads = {ident for log in ran for _, ident in log}
    assert threads & set(cancellers)
    assert threads - set(cancellers)


@pytest.mark.slow
def test_unregister_versus_cancel_runs_exactly_the_callbacks_not_stopped(
    busy_switching: None,
) -> None:
    rounds, unregistrars, per_thread = 200, 3, 40
    total = unregistrars * per_thread
    ran: list[list[tuple[int, int]]] = [[] for _ in range(rounds)]
    stopped: list[list[int]] = [[] for _ in range(rounds)]
    halfway = [threading.Event() for _ in range(rounds)]
    sources = [CancelSource() for _ in range(rounds)]
    registrations = [
        [sources[r].token.on_cancel(_record, ran[r], key) for key in range(total)]
        for r in range(rounds)
    ]

    def work(r: int, w: int) -> None:
        if w == unregistrars:  # the last worker cancels while the others unregister
            assert halfway[r].wait(PATIENCE)
            sources[r].cancel()
            return
        for i, key in enumerate(range(w * per_thread, (w + 1) * per_thread)):
            if registrations[r][key].unregister():
                stopped[r].append(key)
            if i == per_thread // 2:
                halfway[r].set()

    _rounds(unregistrars + 1, rounds, work)
    for r in range(rounds):
        ran_keys = collections.Counter(key for key, _ in ran[r])
        assert set(stopped[r]).isdisjoint(ran_keys), f"round {r}: stopped yet ran"
        assert max(ran_keys.values(), default=1) == 1, f"round {r}: ran twice"
        assert sorted([*stopped[r], *ran_keys]) == list(range(total)), f"round {r}: lost"
    assert any(stopped)
    assert any(ran)


# -- children -------------------------------------------------------------------------


def test_child_is_cancelled_with_its_parent_and_its_reason() -> None:
    parent = CancelSource()
    child = parent.token.child()
    grandchild = child.token.child()
    assert not child.cancel_called
    parent.cancel("parent says stop")
    assert child.token.reason == "parent says stop"
    assert grandchild.token.reason == "parent says stop"


def test_child_can_be_cancelled_alone() -> None:
    parent = CancelSource()
    child = parent.token.child()
    sibling = parent.token.child()
    child.cancel("just me")
    assert child.token.reason == "just me"
    assert not parent.cancel_called
    assert not sibling.cancel_called
    parent.cancel("everyone")
    assert child.token.reason == "just me"
    assert sibling.token.reason == "everyone"


def test_child_of_a_cancelled_parent_is_cancelled_at_once() -> None:
    parent = CancelSource()
    parent.cancel("already")
    child = parent.token.child()
    assert child.token.reason == "already"


def test_child_deadline_is_the_earlier_of_the_two() -> None:
    now = time.monotonic()
    with CancelSource(deadline=now + 100) as parent:
        with parent.token.child(deadline=now + 200) as later:
            assert later.deadline == now + 100
        with parent.token.child(deadline=now + 50) as earlier:
            assert earlier.deadline == now + 50
        with parent.token.child() as none:
            assert none.deadline == now + 100
    with CancelSource() as parent, parent.token.child(deadline=now + 50) as child:
        assert child.deadline == now + 50


def test_child_fires_when_the_parents_deadline_passes() -> None:
    parent = CancelSource(deadline=time.monotonic() + 0.05)
    child = parent.token.child()
    assert child.token.wait(PATIENCE) is True
    assert child.token.reason == "deadline exceeded"
    _assert_no_timer_thread()


@pytest.mark.slow
def test_closed_child_is_forgotten_by_its_parent() -> None:
    parent = CancelSource()
    parent.token.on_cancel(lambda: None)
    child = parent.token.child()
    assert len(_callbacks(parent.token)) == 2
    child_ref = weakref.ref(child)
    child_token_ref = weakref.ref(child.token)
    child.close()
    assert len(_callbacks(parent.token)) == 1
    del child
    gc.collect()
    assert child_ref() is None
    assert child_token_ref() is None


def test_closed_child_is_not_cancelled_by_its_parent() -> None:
    parent = CancelSource()
    child = parent.token.child()
    child.close()
    parent.cancel()
    assert not child.cancel_called


@pytest.mark.slow
def test_dropped_child_is_forgotten_by_its_parent() -> None:
    parent = CancelSource()
    for _ in range(10):
        parent.token.child()
    gc.collect()
    assert _callbacks(parent.token) == {}


def test_child_used_as_a_context_manager_detaches_on_exit() -> None:
    parent = CancelSource()
    with parent.token.child() as child:
        assert isinstance(child, CancelSource)
        assert len(_callbacks(parent.token)) == 1
    assert _callbacks(parent.token) == {}
    assert not child.cancel_called


def test_child_of_a_never_cancelled_token_is_an_ordinary_source() -> None:
    never = current_token()
    child = never.child(deadline=time.monotonic() + 100)
    assert _callbacks(never) == {}
    child.cancel("alone")
    assert child.token.reason == "alone"


# -- close and the context manager ----------------------------------------------------


def test_close_drops_callbacks_without_cancelling() -> None:
    source = CancelSource()
    calls: list[str] = []
    registration = source.token.on_cancel(calls.append, "x")
    source.close()
    assert not source.cancel_called
    assert registration.unregister() is False  # close stopped it, not this call
    source.cancel("later")  # still cancellable
    assert source.token.reason == "later"
    assert calls == []


def test_close_is_idempotent() -> None:
    parent = CancelSource()
    child = parent.token.child()
    child.close()
    child.close()
    assert _callbacks(parent.token) == {}


def test_with_cancel_source_closes_on_exit() -> None:
    calls: list[str] = []
    with CancelSource() as source:
        assert isinstance(source, CancelSource)
        source.token.on_cancel(calls.append, "x")
    assert not source.cancel_called
    source.cancel()
    assert calls == []


def test_with_cancel_source_closes_on_error() -> None:
    calls: list[str] = []
    sources: list[CancelSource] = []

    def failing_block() -> None:
        with CancelSource() as source:
            sources.append(source)
            source.token.on_cancel(calls.append, "x")
            raise KeyError

    with pytest.raises(KeyError):
        failing_block()
    sources[0].cancel()
    assert calls == []


# -- any_of ---------------------------------------------------------------------------


@pytest.mark.parametrize("which", range(3))
def test_any_of_fires_when_any_token_fires(which: int) -> None:
    sources = [CancelSource() for _ in range(3)]
    combined = any_of(*(source.token for source in sources))
    assert not combined.cancel_called
    sources[which].cancel(f"source {which}")
    assert combined.token.reason == f"source {which}"
    others = [s for i, s in enumerate(sources) if i != which]
    assert not any(s.cancel_called for s in others)


def test_any_of_an_already_cancelled_token_is_cancelled_at_once() -> None:
    done = CancelSource()
    done.cancel("earlier")
    assert any_of(CancelSource().token, done.token).token.reason == "earlier"


def test_any_of_takes_the_earliest_deadline_and_fires_by_it() -> None:
    now = time.monotonic()
    late = CancelSource(deadline=now + 100)
    soon = CancelSource(deadline=now + 0.05)
    combined = any_of(late.token, soon.token, CancelSource().token)
    assert combined.deadline == now + 0.05
    assert combined.token.wait(PATIENCE) is True
    assert combined.token.reason == "deadline exceeded"
    late.close()
    combined.close()
    _assert_no_timer_thread()


def test_any_of_nothing_is_never_cancelled_by_itself() -> None:
    combined = any_of()
    assert combined.deadline == math.inf
    assert not combined.cancel_called
    combined.cancel()
    assert combined.cancel_called


def test_any_of_ignores_never_cancelled_tokens() -> None:
    source = CancelSource()
    combined = any_of(current_token(), source.token)
    assert _callbacks(current_token()) == {}
    source.cancel("real")
    assert combined.token.reason == "real"


def test_any_of_closed_detaches_from_every_token() -> None:
    sources = [CancelSource() for _ in range(3)]
    with any_of(*(source.token for source in sources)) as combined:
        assert all(len(_callbacks(s.token)) == 1 for s in sources)
    assert all(_callbacks(s.token) == {} for s in sources)
    sources[0].cancel()
    assert not combined.cancel_called


def test_any_of_a_source_is_a_type_error_naming_the_fix() -> None:
    source = CancelSource()
    with pytest.raises(TypeError, match=r"source\.token"):
        any_of(source.token, source)  # type: ignore[arg-type]


# -- current_token --------------------------------------------------------------------


def test_current_token_outside_a_worker_is_never_cancelled() -> None:
    token = current_token()
    assert isinstance(token, CancelToken)
    assert token is bridgecancel.current_token()
    assert token.cancel_called is False
    assert token.reason is None
    assert token.deadline == math.inf
    assert token.remaining() == math.inf
    assert token.wait(0) is False
    token.check()
    check_cancelled()
    token.sleep(0)


def test_current_token_outside_a_worker_stores_no_callback() -> None:
    token = current_token()
    calls: list[str] = []
    registration = token.on_cancel(calls.append, "never")
    assert _callbacks(token) == {}
    assert registration.unregister() is False
    assert calls == []


def test_current_token_inside_a_worker_context_is_that_token() -> None:
    source = CancelSource()

    def in_worker() -> None:
        assert current_token() is source.token
        check_cancelled()
        source.cancel("job cancelled")
        with pytest.raises(Cancelled) as excinfo:
            check_cancelled()
        assert excinfo.value.token is source.token
        assert excinfo.value.reason == "job cancelled"

    context = contextvars.copy_context()
    context.run(_tokens._current.set, source.token)
    context.run(in_worker)
    # The outer context is untouched.
    assert current_token() is not source.token
    check_cancelled()


# -- fileno ---------------------------------------------------------------------------


def _readable(fd: int, timeout: float = 0) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def test_fileno_becomes_readable_on_cancel() -> None:
    source = CancelSource()
    fd = source.token.fileno()
    assert source.token.fileno() == fd
    assert not _readable(fd)
    source.cancel()
    assert _readable(fd)
    assert _readable(fd)  # stays readable
    assert source.token.fileno() == fd


def test_fileno_of_a_cancelled_token_is_readable_at_once() -> None:
    source = CancelSource()
    source.cancel()
    assert _readable(source.token.fileno())


def test_fileno_wakes_select_when_another_thread_cancels() -> None:
    source = CancelSource()
    fd = source.token.fileno()
    thread = _in_thread(source.cancel)
    assert _readable(fd, PATIENCE)
    _join(thread)


def test_fileno_becomes_readable_when_the_deadline_passes() -> None:
    source = CancelSource(deadline=time.monotonic() + 0.05)
    assert _readable(source.token.fileno(), PATIENCE)


def test_fileno_is_the_same_when_first_asked_from_many_threads() -> None:
    token = CancelSource().token
    barrier = threading.Barrier(8)
    fds: list[int] = []

    def ask() -> None:
        barrier.wait()
        fds.append(token.fileno())

    threads = [_in_thread(ask) for _ in range(8)]
    for thread in threads:
        _join(thread)
    assert len(set(fds)) == 1


def test_fileno_is_closed_when_the_token_is_collected() -> None:
    source = CancelSource()
    fd = source.token.fileno()
    os.fstat(fd)
    del source
    gc.collect()
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(fd)


# -- robustness -----------------------------------------------------------------------


def _run_python(code: str) -> None:
    """Run `code` in a fresh interpreter; a deadlock shows as a timeout."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_garbage_collection_inside_the_timer_does_not_deadlock() -> None:
    # A token with a pending deadline, freed by the collector while the timer's lock
    # is held (any allocation may start a collection), must not deadlock.
    _run_python(
        """
        import gc, time
        from bridgecancel import CancelSource

        def garbage():
            source = CancelSource(deadline=time.monotonic() + 60)
            source.token.on_cancel(print)  # a cycle: only the collector frees it

        for extra in range(40):
            gc.disable()
            gc.collect()
            garbage()
            gc.set_threshold(gc.get_count()[0] + extra)
            gc.enable()
            CancelSource(deadline=time.monotonic() + 60).close()
        gc.set_threshold(700)
        print("ok")
        """
    )


def test_garbage_collection_inside_a_token_lock_does_not_deadlock() -> None:
    # A child freed by the collector unregisters from its parent, taking the parent's
    # lock; a collection started while that lock is held must not deadlock.
    _run_python(
        """
        import gc
        from bridgecancel import CancelSource

        for extra in range(40):
            parent = CancelSource()

            def garbage():
                child = parent.token.child()
                child.token.on_cancel(lambda: child)  # a cycle

            gc.disable()
            gc.collect()
            garbage()
            gc.set_threshold(gc.get_count()[0] + extra)
            gc.enable()
            parent.token.wait(0)
            parent.token.fileno()
            parent.close()
        gc.set_threshold(700)
        print("ok")
        """
    )


@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
def test_deadlines_fire_in_a_forked_child() -> None:
    # The parent's timer thread is running when it forks; in the child it is gone.
    pending = CancelSource(deadline=time.monotonic() + 100)
    try:
        assert _timer_threads()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                source = CancelSource(deadline=time.monotonic() + 0.05)
                if source.token.wait(PATIENCE) and pending.token.wait(0) is False:
                    code = 0
            finally:
                os._exit(code)
        give_up = time.monotonic() + PATIENCE * 2
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > give_up:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                pytest.fail("the forked child hung")
            time.sleep(0.01)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        pending.close()


# -- the token internals the bridge relies on -----------------------------------------


def test_cancel_called_is_a_plain_slot_users_cannot_assign() -> None:
    token = CancelSource().token
    # A member descriptor of __slots__: reading it runs no Python code and no C getter.
    owner = next(k for k in CancelToken.__mro__ if "cancel_called" in vars(k))
    descriptor = vars(owner)["cancel_called"]
    assert type(descriptor).__name__ == "member_descriptor"
    with pytest.raises(AttributeError, match="read-only"):
        token.cancel_called = True  # type: ignore[misc]
    with pytest.raises(AttributeError, match="read-only"):
        token._reason = "forged"
    assert token.cancel_called is False
    assert token.reason is None


def test_tokens_cannot_be_made_directly() -> None:
    with pytest.raises(TypeError, match="CancelSource"):
        CancelToken()


def test_cancel_detached_wakes_every_waiter_in_the_calling_thread(
    unraisable: list[Any],
) -> None:
    source = CancelSource()
    token = source.token
    child = token.child()
    follower = any_of(token)
    caller = threading.get_ident()
    inline: list[int] = []
    user: list[int] = []
    token._on_cancel_inline(lambda: inline.append(threading.get_ident()))
    child.token._on_cancel_inline(lambda: inline.append(threading.get_ident()))
    user_ran = threading.Event()

    def user_callback() -> None:
        user.append(threading.get_ident())
        user_ran.set()

    token.on_cancel(user_callback)
    waiter_woke = threading.Event()

    def wait_then_mark() -> None:
        if token.wait():
            waiter_woke.set()

    waiter = _in_thread(wait_then_mark)
    fd = token.fileno()

    source._cancel_detached("scope cancelled")

    # All of this holds the moment the call returns, before any other thread ran.
    assert token.cancel_called
    assert token.reason == "scope cancelled"
    assert child.cancel_called
    assert child.token.reason == "scope cancelled"
    assert follower.cancel_called
    assert inline == [caller, caller]
    assert select.select([fd], [], [], 0)[0] == [fd]
    _join(waiter)
    assert waiter_woke.is_set()
    assert user_ran.wait(PATIENCE)
    assert user != [caller]
    assert unraisable == []


def test_cancel_detached_runs_user_callbacks_of_followers_off_the_caller() -> None:
    source = CancelSource()
    child = source.token.child()
    threads: list[str] = []
    done = threading.Event()

    def record_thread() -> None:
        threads.append(threading.current_thread().name)
        done.set()

    child.token.on_cancel(record_thread)
    source._cancel_detached("x")
    assert done.wait(PATIENCE)
    assert threads == ["bridgecancel callbacks"]


def test_cancel_detached_sends_callback_errors_to_the_hook_and_never_raises(
    unraisable: list[Any],
) -> None:
    source = CancelSource()
    ran = threading.Event()

    def fail() -> None:
        raise ValueError("callback failed")

    source.token.on_cancel(ran.set)
    source.token.on_cancel(fail)  # newest first: fails, then ran.set still runs
    source._cancel_detached("x")
    assert ran.wait(PATIENCE)
    deadline = time.monotonic() + PATIENCE
    while not unraisable and time.monotonic() < deadline:
        time.sleep(0.001)
    assert [type(u.exc_value) for u in unraisable] == [ValueError]
    assert unraisable[0].object is source.token


def test_cancel_detached_never_blocks_on_a_slow_user_callback() -> None:
    source = CancelSource()
    release = threading.Event()
    started = threading.Event()

    def slow() -> None:
        started.set()
        release.wait(PATIENCE)

    source.token.on_cancel(slow)
    before = time.monotonic()
    source._cancel_detached("x")
    assert time.monotonic() - before < PROMPT
    assert started.wait(PATIENCE)  # it runs, elsewhere
    release.set()
    for thread in threading.enumerate():
        if thread.name == "bridgecancel callbacks":
            thread.join(PATIENCE)


def test_cancel_detached_is_idempotent_and_the_first_reason_wins() -> None:
    source = CancelSource()
    calls: list[str] = []
    done = threading.Event()

    def record_call() -> None:
        calls.append("ran")
        done.set()

    source.token.on_cancel(record_call)
    source.cancel("first")
    source._cancel_detached("second")
    source._cancel_detached("third")
    assert done.wait(PATIENCE)
    assert calls == ["ran"]
    assert source.token.reason == "first"


def test_informative_source_reports_its_deadline_but_never_fires_by_itself(
    no_timer: None,
) -> None:
    deadline = time.monotonic() + 0.05
    source = _tokens.informative_source(deadline)
    token = source.token
    assert token.deadline == deadline == source.deadline
    assert 0 < token.remaining() <= 0.05
    assert _timer.timer.pending() == 0  # no timer entry
    assert not token.wait(0.2)  # well past the deadline
    assert token.remaining() == 0.0
    assert not token.cancel_called
    source.cancel("the caller's scope")
    assert token.cancel_called
    assert token.reason == "the caller's scope"


def test_informative_source_past_deadline_is_not_cancelled() -> None:
    source = _tokens.informative_source(time.monotonic() - 1)
    assert not source.token.cancel_called
    assert source.token.remaining() == 0.0


def test_child_of_an_informative_token_fires_at_its_own_deadline_only() -> None:
    parent = _tokens.informative_source(time.monotonic() - 1)  # already "passed"
    plain = parent.token.child()
    assert plain.token.deadline == parent.token.deadline  # reported
    own = time.monotonic() + 0.05
    timed = parent.token.child(deadline=own)
    assert timed.token.deadline == parent.token.deadline  # the earlier, reported
    assert timed.token.wait(PATIENCE)  # fires at its own deadline
    assert timed.token.reason == "deadline exceeded"
    assert not plain.token.cancel_called
    assert not parent.token.cancel_called
    parent.cancel("scope")
    assert plain.token.cancel_called
    assert plain.token.reason == "scope"
    plain.close()
    timed.close()


def test_informative_source_checks_its_deadline() -> None:
    with pytest.raises(ValueError, match="NaN"):
        _tokens.informative_source(math.nan)
    with pytest.raises(TypeError, match="monotonic"):
        _tokens.informative_source("soon")  # type: ignore[arg-type]


def test_any_of_an_informative_token_reports_but_does_not_fire_at_its_deadline() -> None:
    informative = _tokens.informative_source(time.monotonic() - 1)
    combined = any_of(informative.token)
    assert combined.token.deadline == informative.token.deadline
    assert not combined.token.wait(0.05)
    informative.cancel("scope")
    assert combined.cancel_called
    combined.close()


def test_an_inline_registration_can_be_unregistered() -> None:
    source = CancelSource()
    ran: list[str] = []
    registration = source.token._on_cancel_inline(ran.append, "inline")
    assert registration.unregister() is True
    source._cancel_detached("x")
    assert ran == []
