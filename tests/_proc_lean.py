"""A job module that imports bridgecancel as the README shows, and nothing async."""

from __future__ import annotations

import sys

from bridgecancel import current_token


def async_libraries_loaded() -> list[str]:
    """The async libraries loaded in this worker, after `from bridgecancel import ...`."""
    current_token().check()
    return sorted(
        name for name in sys.modules if name.split(".")[0] in ("anyio", "asyncio", "trio")
    )


def package_facade() -> list[str]:
    """Which of the facade's own names the worker's ``bridgecancel`` package has."""
    import bridgecancel

    wanted = ("__all__", "__getattr__", "__version__")
    return [name for name in wanted if name in vars(bridgecancel)]
