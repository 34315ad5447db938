"""The pytest plugin ``bridgecancel.testing``: the ``no_leaked_workers`` fixture and its setting.

Only pytest loads this module. The installed package registers it as the ``pytest11``
entry point named ``bridgecancel.testing``, the name ``-p bridgecancel.testing`` and
``pytest_plugins = ["bridgecancel.testing"]`` give too. Where pytest imports the module
`bridgecancel.testing` instead (no such entry point installed, or a conftest's
pytest_plugins on pytest 8), that module's own ``pytest_plugins`` names this one. So
`bridgecancel.testing` imports neither pytest nor this module, and this one imports it:
no import circle.

Opt-in as anyio's plugin is: the fixture is not autouse, so the plugin applies nothing
unless a test asks for it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .testing import check_no_leaks

__all__ = (
    "no_leaked_workers",
    "pytest_addoption",
)


def pytest_addoption(parser: pytest.Parser) -> None:
    """pytest hook: the ``bridgecancel_leak_settle`` setting of ``no_leaked_workers``."""
    parser.addini(
        "bridgecancel_leak_settle",
        "seconds the no_leaked_workers fixture waits for threads and processes to end",
        default="5",
    )


@pytest.fixture
def no_leaked_workers(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test if it leaves a thread, a running job or a child process behind.

    Not autouse: ask for it by name, with ``@pytest.mark.usefixtures("no_leaked_workers")``,
    or for every test with ``usefixtures = ["no_leaked_workers"]`` in pytest's settings.
    The ``bridgecancel_leak_settle`` setting is the seconds it waits for stragglers (5).
    See `bridgecancel.testing.check_no_leaks`.
    """
    settle = float(request.config.getini("bridgecancel_leak_settle"))
    with check_no_leaks(settle=settle):
        yield
