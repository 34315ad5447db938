"""Checks of the arguments `run_sync` and `run_process` share, with errors that say what to do.

A bad call fails here, before any worker or limiter token is touched, so it never breaks
a pool or another job.
"""

from __future__ import annotations

import functools
import inspect
import math
import types
from typing import Any

import anyio

from ._describe import describe
from ._seconds import check_seconds

__all__ = ("check_call",)


def check_call(
    api: str,
    func: object,
    limiter: object,
    *,
    interrupt_after: float | None,
    kill_after: float | None = None,
) -> tuple[float | None, float | None]:
    """Check a call of `api` (``"run_sync"`` or ``"run_process"``).

    Returns `interrupt_after` and `kill_after` as floats, or None for a stage that never
    comes (None or infinity).
    """
    _check_func(api, func)
    if limiter is not None and not isinstance(limiter, anyio.CapacityLimiter):
        raise TypeError(
            f"{api}() takes limiter=anyio.CapacityLimiter(n) (or None for the default "
            f"limiter), got {limiter!r}; to allow n jobs at once, pass "
            "anyio.CapacityLimiter(n)"
        )
    if interrupt_after is not None:
        interrupt_after = _stage(api, "interrupt_after", interrupt_after)
    if kill_after is not None:
        kill_after = _stage(api, "kill_after", kill_after)
    return interrupt_after, kill_after


# Code flags of `async def` functions and async generators.
_ASYNC_FLAGS = inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR | inspect.CO_ITERABLE_COROUTINE


def _check_func(api: str, func: object) -> None:
    if (
        type(func) is types.FunctionType
        and not func.__code__.co_flags & _ASYNC_FLAGS
        and "_is_coroutine_marker" not in func.__dict__  # inspect.markcoroutinefunction
    ):
        return  # a plain def: the common case, checked without inspect
    if not callable(func):
        raise TypeError(f"{api}() needs a callable (a sync function) to run, got {func!r}")
    if isinstance(func, (type, types.BuiltinFunctionType, types.MethodWrapperType)):
        return  # classes and builtins are sync (and this check is on every call)
    target: Any = func
    while isinstance(target, functools.partial):
        target = target.func
    for candidate in (func, target):
        if inspect.iscoroutinefunction(candidate):
            raise TypeError(
                f"{describe(func)} is a coroutine function (async def): await it directly "
                f"instead of passing it to {api}()"
            )
        if inspect.isasyncgenfunction(candidate):
            raise TypeError(
                f"{describe(func)} is an async generator function: iterate it with "
                f"'async for' instead of passing it to {api}()"
            )


def _stage(api: str, name: str, value: float) -> float | None:
    """An escalation stage's seconds; None (never) for infinity."""
    seconds = check_seconds(value, api, name, none="to skip that stage")
    return None if seconds == math.inf else seconds
