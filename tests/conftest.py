"""Shared fixtures: every async test runs on asyncio and trio; no test may leak a worker."""

from __future__ import annotations

import pytest

# The session's PostgreSQL server, shared by every test file that asks for it.
from _postgres import pg_server as pg_server

# The leak check users get too (also loaded by the package's pytest11 entry point).
pytest_plugins = ["bridgecancel.testing"]


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(autouse=True)
def no_leaks(no_leaked_workers: None) -> None:
    """Fail the test if it leaves a thread, a running job or a child process behind.

    bridgecancel.testing's check: threads, running jobs (statistics()) and child
    processes, after up to 5 s for them to settle; idle pooled workers are allowed.
    """


# -- web tests: each once per server, on the backend it runs (a module that uses them
# overrides `anyio_backend` with ``server_and_backend[1]``) --------------------------------


@pytest.fixture(
    params=[
        pytest.param(("uvicorn", "asyncio"), id="uvicorn-asyncio"),
        pytest.param(("hypercorn", "asyncio"), id="hypercorn-asyncio"),
        pytest.param(("hypercorn", "trio"), id="hypercorn-trio"),
    ]
)
def server_and_backend(request: pytest.FixtureRequest) -> tuple[str, str]:
    server_and_backend: tuple[str, str] = request.param
    return server_and_backend


@pytest.fixture
def server(server_and_backend: tuple[str, str]) -> str:
    return server_and_backend[0]
