"""`bridgecancel.asgi.threaded`: a sync function made async, run through run_sync."""

from __future__ import annotations

import inspect
import threading
from collections.abc import Iterator

import anyio
import anyio.from_thread
import pytest

import bridgecancel
from bridgecancel.asgi import threaded

pytestmark = pytest.mark.anyio


def lookup(item_id: int, q: str | None = None, *, limit: int = 10) -> dict[str, object]:
    """Find things."""
    return {
        "item_id": item_id,
        "q": q,
        "limit": limit,
        "thread": threading.current_thread().name,
    }


def test_the_wrapper_keeps_name_docstring_and_signature() -> None:
    wrapped = threaded(lookup)
    assert inspect.iscoroutinefunction(wrapped)
    assert wrapped.__name__ == "lookup"
    assert wrapped.__doc__ == "Find things."
    signature = inspect.signature(wrapped)
    assert list(signature.parameters) == ["item_id", "q", "limit"]
    # String annotations (PEP 563) are evaluated, so a framework resolving them in the
    # wrapper's module still gets the real types.
    assert signature.parameters["item_id"].annotation is int
    assert signature.parameters["q"].annotation == (str | None)
    assert signature.parameters["limit"].kind is inspect.Parameter.KEYWORD_ONLY
    assert signature.return_annotation == dict[str, object]


def test_annotations_that_cannot_be_evaluated_stay_strings() -> None:
    def handler(item: Unknown) -> None:  # type: ignore[name-defined]  # noqa: F821
        pass

    parameter = inspect.signature(threaded(handler)).parameters["item"]
    assert parameter.annotation == "Unknown"


async def test_it_runs_in_a_worker_thread_with_args_and_kwargs() -> None:
    result = await threaded(lookup)(3, "x", limit=5)
    assert result["item_id"] == 3
    assert result["q"] == "x"
    assert result["limit"] == 5
    assert result["thread"] != threading.current_thread().name


async def test_with_options_it_passes_them_to_run_sync() -> None:
    limiter = anyio.CapacityLimiter(1)
    seen = []

    @threaded(limiter=limiter)
    def held() -> None:
        seen.append(limiter.borrowed_tokens)

    await held()
    assert seen == [1]
    assert limiter.borrowed_tokens == 0


async def test_the_callers_cancellation_fires_the_workers_token() -> None:
    started = anyio.Event()
    outcome: list[object] = []

    @threaded
    def wait_for_cancel(seconds: float) -> bool:
        anyio.from_thread.run_sync(started.set)
        token = bridgecancel.current_token()
        outcome.append(token.wait(seconds))
        token.check()
        return False

    async with anyio.create_task_group() as group:
        group.start_soon(wait_for_cancel, 30.0)
        with anyio.fail_after(10):
            await started.wait()
        group.cancel_scope.cancel()
    assert outcome == [True]


async def test_interrupt_after_stops_a_worker_that_ignores_its_token() -> None:
    started = anyio.Event()
    stopped = threading.Event()

    @threaded(interrupt_after=0.05)
    def spin() -> None:
        anyio.from_thread.run_sync(started.set)
        try:
            while True:
                pass
        finally:
            stopped.set()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            group.start_soon(spin)
            await started.wait()
            group.cancel_scope.cancel()
    assert stopped.is_set()


def test_what_it_cannot_wrap_is_refused_with_what_to_do() -> None:
    async def already_async() -> None:
        pass

    async def async_gen() -> object:
        yield 1

    def gen() -> Iterator[int]:
        yield 1

    with pytest.raises(TypeError, match="already async"):
        threaded(already_async)
    with pytest.raises(TypeError, match="already async"):
        threaded(async_gen)
    with pytest.raises(TypeError, match="move the blocking part"):
        threaded(gen)
    with pytest.raises(TypeError, match="decorates a function"):
        threaded(42)  # type: ignore[call-overload]


def test_bad_options_are_refused_when_decorating() -> None:
    with pytest.raises(ValueError, match="or None to never interrupt"):
        threaded(interrupt_after=-1)
    with pytest.raises(TypeError, match="interrupt_after"):
        threaded(interrupt_after="1")  # type: ignore[call-overload]
