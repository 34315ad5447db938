"""How messages name a function: one helper for the caller's side and the worker's.

Standard library only: the worker process imports it.
"""

from __future__ import annotations

__all__ = ("describe",)


def describe(func: object) -> str:
    """``module.qualname()`` for a function, its repr for anything else."""
    name = getattr(func, "__qualname__", None)
    if name is None:
        return repr(func)
    module = getattr(func, "__module__", None)
    return f"{module}.{name}()" if module else f"{name}()"
