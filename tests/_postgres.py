"""The PostgreSQL server of a test session: the `pg_server` fixture (registered in conftest).

It is the server ``BRIDGECANCEL_TEST_PG_DSN`` names (``.ci/run`` sets it with
``.ci/postgres.sh``), or else one that ``.ci/postgres.sh --no-install`` starts here for the
session (a port and a data folder of its own), stopped when the session ends. One server
per session, whichever test files ask for it. Only when neither gives a server, and ``CI``
is not set, are the PostgreSQL tests skipped, with a reason that says so; under CI they
fail instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import psycopg
import pytest

PG_SCRIPT = Path(__file__).resolve().parent.parent / ".ci" / "postgres.sh"


def _pg_unavailable(reason: str) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the PostgreSQL tests, but {reason}", pytrace=False)
    pytest.skip(
        f"PostgreSQL tests NOT RUN: {reason}. Install Debian's postgresql package "
        "(apt-get install postgresql) or set BRIDGECANCEL_TEST_PG_DSN; CI runs them."
    )


def _pg_script(folder: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run .ci/postgres.sh for the server whose data folder is `folder`."""
    return subprocess.run(
        ["bash", str(PG_SCRIPT), *args],
        env={**os.environ, "BRIDGECANCEL_PG_DIR": folder},
        capture_output=True, text=True, timeout=120, check=False,
    )


def _start_pg(folder: str) -> str:
    """Start a server in `folder` (on a free port); its DSN."""
    try:
        result = _pg_script(folder, "--no-install")
    except (OSError, subprocess.TimeoutExpired) as exc:
        _pg_unavailable(f"{PG_SCRIPT} could not run ({exc})")
    if result.returncode != 0:
        _pg_unavailable(f"{PG_SCRIPT} could not start a server: {result.stderr.strip()}")
    return result.stdout.strip()


def _check_pg(dsn: str) -> None:
    try:
        psycopg.connect(dsn, connect_timeout=10).close()
    except psycopg.OperationalError as exc:
        _pg_unavailable(f"no PostgreSQL answers at {dsn!r} ({exc})")


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """A DSN of a reachable PostgreSQL server: the given one, or one started for this session.

    A server started here has a port and a data folder of its own, so test runs side by
    side never share one; it is stopped and its folder removed when the session ends,
    whatever the tests did.
    """
    given = os.environ.get("BRIDGECANCEL_TEST_PG_DSN")
    if given:
        _check_pg(given)
        yield given
        return
    # In the temporary folder itself: the server's own user (postgres, when the tests run
    # as root) must reach it, which it cannot below pytest's private temporary folders.
    folder = tempfile.mkdtemp(prefix="bridgecancel-pg.")
    try:
        dsn = _start_pg(folder)
        _check_pg(dsn)
        yield dsn
    finally:
        stopped = _pg_script(folder, "--stop")
        assert stopped.returncode == 0, (
            f"the PostgreSQL server of {folder} did not stop: {stopped.stderr.strip()}"
        )
        shutil.rmtree(folder, ignore_errors=True)


def wait_for(predicate: Callable[[], bool], timeout: float) -> float | None:
    """Seconds until `predicate()` is true, polled every 5 ms; None on timeout."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        if predicate():
            return time.perf_counter() - started
        time.sleep(0.005)
    return None
