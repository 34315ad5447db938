"""`bridgecancel.asgi.threaded`: a sync function made async, run through run_sync; a sync
generator function made an async generator function, run through iterate."""

from __future__ import annotations

import contextlib
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

    with pytest.raises(TypeError, match="already async"):
        threaded(already_async)
    with pytest.raises(TypeError, match="already async"):
        threaded(async_gen)
    with pytest.raises(TypeError, match="decorates a function"):
        threaded(42)  # type: ignore[call-overload]


# -- generator functions: through bridgecancel.iterate ---------------------------------


def export(rows: int, *, prefix: str = "row") -> Iterator[str]:
    """Stream rows."""
    for i in range(rows):
        yield f"{prefix} {i} {threading.current_thread().name}"


def test_a_generator_function_becomes_an_async_generator_function() -> None:
    wrapped = threaded(export)
    assert inspect.isasyncgenfunction(wrapped)  # what FastAPI streams
    assert wrapped.__name__ == "export"
    assert wrapped.__doc__ == "Stream rows."
    assert list(inspect.signature(wrapped).parameters) == ["rows", "prefix"]
    assert inspect.signature(wrapped).return_annotation == Iterator[str]


async def test_a_generator_streams_each_step_in_a_worker_under_one_token() -> None:
    tokens: list[bridgecancel.CancelToken] = []

    @threaded(limiter=anyio.CapacityLimiter(1))
    def rows(n: int) -> Iterator[int]:
        for i in range(n):
            tokens.append(bridgecancel.current_token())
            yield i

    assert [row async for row in rows(3)] == [0, 1, 2]
    assert tokens == [tokens[0]] * 3
    lines = [line async for line in threaded(export)(2, prefix="line")]
    assert [line.split()[:2] for line in lines] == [["line", "0"], ["line", "1"]]
    assert all(threading.current_thread().name not in line for line in lines)


async def test_the_callers_cancellation_stops_a_generator_step() -> None:
    started = anyio.Event()
    finally_threads: list[threading.Thread] = []

    @threaded
    def rows() -> Iterator[int]:
        try:
            yield 0
            anyio.from_thread.run_sync(started.set)
            bridgecancel.current_token().sleep(30)
            yield 1  # pragma: no cover - the token fired
        finally:
            finally_threads.append(threading.current_thread())

    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:

            async def consume() -> None:
                async for _ in rows():
                    pass  # pragma: no cover - cancelled in the second step

            group.start_soon(consume)
            await started.wait()
            group.cancel_scope.cancel()
    assert len(finally_threads) == 1
    assert finally_threads[0] is not threading.current_thread()


async def test_as_a_context_manager_its_except_sees_the_error_in_a_worker() -> None:
    """A ``yield`` dependency (FastAPI enters it with asynccontextmanager)."""
    seen: list[tuple[str, object]] = []

    @threaded
    def session(swallow: bool) -> Iterator[str]:
        try:
            yield "session"
        except KeyError as exc:
            seen.append(("except", threading.current_thread()))
            if not swallow:
                raise RuntimeError("rolled back") from exc
        finally:
            seen.append(("finally", threading.current_thread()))

    async def endpoint(swallow: bool) -> None:
        async with contextlib.asynccontextmanager(session)(swallow) as value:
            assert value == "session"
            raise KeyError("from the endpoint")

    with pytest.raises(RuntimeError, match="rolled back"):
        await endpoint(swallow=False)
    await endpoint(swallow=True)
    assert [what for what, _ in seen] == ["except", "finally"] * 2
    assert all(thread is not threading.current_thread() for _, thread in seen)


async def test_as_a_context_manager_a_cancellation_closes_it_with_the_token_fired() -> None:
    seen: list[tuple[bool, str | None]] = []

    @threaded
    def session() -> Iterator[str]:
        try:
            yield "session"
        finally:
            token = bridgecancel.current_token()
            seen.append((token.cancel_called, token.reason))

    with anyio.CancelScope() as scope:
        async with contextlib.asynccontextmanager(session)():
            scope.cancel("request cancelled")
            await anyio.sleep_forever()
    assert scope.cancelled_caught
    assert seen == [(True, "request cancelled")]


def test_bad_options_are_refused_when_decorating() -> None:
    with pytest.raises(ValueError, match="or None to never interrupt"):
        threaded(interrupt_after=-1)
    with pytest.raises(TypeError, match="interrupt_after"):
        threaded(interrupt_after="1")  # type: ignore[call-overload]
