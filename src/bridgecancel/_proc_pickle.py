"""Pickling a `run_process` job in the caller, before any worker is used.

So that a function or argument that cannot be sent fails the call at once, with a
message naming the culprit and what to do, and never costs a worker.
"""

from __future__ import annotations

import pickle
import sys
from collections.abc import Callable

from . import _proc_wire as wire
from ._describe import describe
from ._proc_handle import main_is_loadable

__all__ = ("check_not_loading_main", "pickle_job")


def check_not_loading_main() -> None:
    worker = sys.modules.get("bridgecancel._worker")
    if worker is not None and worker.loading_parent_main():
        raise RuntimeError(
            "run_process() was called while a worker process was importing the main "
            "script to load a function from it; put the script's top-level code under "
            "if __name__ == '__main__':"
        )


def pickle_job(func: Callable[..., object], args: tuple[object, ...]) -> bytes:
    """Pickle ``(func, args)`` now, so errors name the culprit before a worker is used."""
    if getattr(func, "__module__", None) == "__main__" and not main_is_loadable():
        return _pickle_by_value(func, args)
    try:
        return wire.dumps((func, args))
    except Exception as exc:
        raise pickle.PicklingError(_unpicklable_message(func, args)) from exc


def _pickle_by_value(func: Callable[..., object], args: tuple[object, ...]) -> bytes:
    """A function from an interactive ``__main__``: workers cannot import it by name."""
    try:
        import cloudpickle  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        raise pickle.PicklingError(
            f"{describe(func)} is defined in an interactive __main__ (a REPL, a notebook "
            "or python -c), which worker processes cannot import; define it in a module, "
            "or install cloudpickle (pip install cloudpickle) to send it by value"
        ) from None
    data: bytes = cloudpickle.dumps((func, args), pickle.HIGHEST_PROTOCOL)
    return data


def _unpicklable_message(func: Callable[..., object], args: tuple[object, ...]) -> str:
    fix = _cloudpickle_hint()
    try:
        wire.dumps(func)
    except Exception as exc:
        return (
            f"cannot send {describe(func)} to a worker process: pickling it failed "
            f"({wire.describe_pickling_error(exc)}); define it at module level (lambdas, "
            f"closures and nested functions cannot be pickled by name){fix}"
        )
    for index, arg in enumerate(args):
        try:
            wire.dumps(arg)
        except Exception as exc:
            return (
                f"cannot send argument {index} of {describe(func)}, a "
                f"{type(arg).__qualname__}, to a worker process: pickling it failed "
                f"({wire.describe_pickling_error(exc)}); pass picklable data (locks, "
                "open files, sockets and generators cannot be pickled)"
            )
    return f"cannot pickle the call {describe(func)} to send it to a worker process"


def _cloudpickle_hint() -> str:
    try:
        import cloudpickle  # type: ignore[import-not-found,unused-ignore]  # noqa: F401
    except ImportError:
        return ", or install cloudpickle (pip install cloudpickle) to send it by value"
    return ""


