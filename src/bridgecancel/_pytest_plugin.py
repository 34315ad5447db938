"""The fixtures of the ``bridgecancel.testing`` pytest plugin (imported only by pytest)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .testing import check_no_leaks

__all__ = (
    "no_leaked_workers",
)

@pytest.fixture
def no_leaked_workers(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test if it leaves a thread, a running job or a child process behind.

    Not autouse: ask for it by name, with ``@pytest.mark.usefixtures("no_leaked_workers")``,
    or for every test with ``usefixtures = ["no_leaked_workers"]`` in pytest's settings.
    See `bridgecancel.testing.check_no_leaks`.
    """
    settle = float(request.config.getini("bridgecancel_leak_settle"))
    with check_no_leaks(settle=settle):
        yield
