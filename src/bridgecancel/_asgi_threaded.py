"""`threaded`: a sync endpoint or dependency made async, running through `run_sync`.

Public as `bridgecancel.asgi.threaded`; kept apart from the middleware, which it does not
need.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar, overload

import anyio

from ._threads import run_sync

__all__ = ("threaded",)

_P = ParamSpec("_P")
_T = TypeVar("_T")


@overload
def threaded(func: Callable[_P, _T], /) -> Callable[_P, Coroutine[Any, Any, _T]]: ...


@overload
def threaded(
    *,
    limiter: anyio.CapacityLimiter | None = None,
    interrupt_after: float | None = None,
) -> Callable[[Callable[_P, _T]], Callable[_P, Coroutine[Any, Any, _T]]]: ...


def threaded(
    func: Callable[_P, _T] | None = None,
    /,
    *,
    limiter: anyio.CapacityLimiter | None = None,
    interrupt_after: float | None = None,
) -> (
    Callable[_P, Coroutine[Any, Any, _T]]
    | Callable[[Callable[_P, _T]], Callable[_P, Coroutine[Any, Any, _T]]]
):
    """Turn a sync function into an async one that runs it through `bridgecancel.run_sync`.

    For web frameworks that run a plain ``def`` endpoint or dependency in
    ``anyio.to_thread.run_sync`` (which waits for the thread and gives it no way to
    stop): decorated, it runs in a worker thread whose `current_token()` fires when the
    request is cancelled (for instance by `CancelOnDisconnectMiddleware`).

    The wrapper keeps the function's name, docstring and signature (with string
    annotations evaluated where possible), so FastAPI injects path, query, body and
    ``Depends`` parameters as it did. Use it bare (``@threaded``) or with `run_sync`'s
    options (``@threaded(interrupt_after=1.0)``).

    Args:
        func: a synchronous function (not a coroutine or generator function).
        limiter: passed to `run_sync`.
        interrupt_after: passed to `run_sync`.

    Raises:
        TypeError: if `func` is an async function, a generator function or not callable,
            or `interrupt_after` is not a number.
        ValueError: if `interrupt_after` is negative or NaN.
    """
    if interrupt_after is not None:  # checked here, not at the first request
        if isinstance(interrupt_after, bool) or not isinstance(interrupt_after, (int, float)):
            raise TypeError(
                f"interrupt_after must be a number of seconds or None, got {interrupt_after!r}"
            )
        if math.isnan(interrupt_after) or interrupt_after < 0:
            raise ValueError(
                f"interrupt_after must be 0 or more seconds, got {interrupt_after}; "
                "pass None to never interrupt"
            )
    if func is None:
        return functools.partial(_threaded, limiter=limiter, interrupt_after=interrupt_after)
    return _threaded(func, limiter=limiter, interrupt_after=interrupt_after)


def _threaded(
    func: Callable[_P, _T],
    *,
    limiter: anyio.CapacityLimiter | None,
    interrupt_after: float | None,
) -> Callable[_P, Coroutine[Any, Any, _T]]:
    if not callable(func):
        raise TypeError(f"@threaded decorates a function, got {func!r}")
    if inspect.iscoroutinefunction(func) or inspect.isasyncgenfunction(func):
        raise TypeError(f"{func!r} is already async: @threaded is for plain `def` functions")
    if inspect.isgeneratorfunction(func):
        raise TypeError(
            f"{func!r} is a generator function, which @threaded cannot run in one "
            "worker call; move the blocking part into a plain function and decorate that"
        )

    @functools.wraps(func)
    async def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        if kwargs:  # frameworks pass parameters by name
            call = functools.partial(func, *args, **kwargs)
            return await run_sync(call, limiter=limiter, interrupt_after=interrupt_after)
        return await run_sync(func, *args, limiter=limiter, interrupt_after=interrupt_after)

    wrapper.__signature__ = _signature(func)  # type: ignore[attr-defined]
    return wrapper


def _signature(func: Callable[..., object]) -> inspect.Signature:
    # Evaluated annotations: a framework that resolves string annotations in the
    # wrapper's globals (older FastAPI releases do) would look in this module.
    try:
        return inspect.signature(func, eval_str=True)
    except Exception:  # a name only imported under TYPE_CHECKING, say
        return inspect.signature(func)
