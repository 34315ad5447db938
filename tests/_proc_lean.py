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
