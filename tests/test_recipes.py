"""The recipes in examples/recipe_*.py, run against the real library.

One test makes a token current by hand (`bridgecancel._tokens._current`), to run a
recipe's worker side without the bridge; it will use the public `use_token` once that
exists.
"""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

import anyio
import pytest

import bridgecancel

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PROMPT = 2.0  # generous bound for "stopped promptly" on a shared machine


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sqlite_recipe = load("recipe_sqlite")
socket_recipe = load("recipe_socket_download")
tree_recipe = load("recipe_process_tree")


# -- SQLite -------------------------------------------------------------------------


@pytest.mark.anyio
async def test_sqlite_query_returns_its_result(anyio_backend: str) -> None:
    assert await bridgecancel.run_sync(sqlite_recipe.query_one, ":memory:", "SELECT 6 * 7") == 42


@pytest.mark.anyio
@pytest.mark.slow
async def test_sqlite_long_query_stops_on_cancel(anyio_backend: str) -> None:
    before = bridgecancel.statistics().threads
    with anyio.move_on_after(0.3) as scope:
        await bridgecancel.run_sync(sqlite_recipe.query_one, ":memory:", sqlite_recipe.SLOW_QUERY)
    late = anyio.current_time() - scope.deadline
    assert scope.cancelled_caught
    assert late < PROMPT
    # The worker raised Cancelled (it stopped because of its token, not by finishing).
    assert bridgecancel.statistics().threads.cooperative == before.cooperative + 1


def test_sqlite_interrupt_is_what_stops_a_running_query() -> None:
    # Without the bridge: the same on_cancel(conn.interrupt) registration, fired from
    # another thread while the query runs in this one.
    source = bridgecancel.CancelSource()
    bridgecancel._tokens._current.set(source.token)
    try:
        timer = threading.Timer(0.2, source.cancel)
        timer.start()
        started = time.monotonic()
        with pytest.raises(bridgecancel.Cancelled):
            sqlite_recipe.query_one(":memory:", sqlite_recipe.SLOW_QUERY)
        assert time.monotonic() - started < PROMPT
        timer.join()
    finally:
        bridgecancel._tokens._current.set(bridgecancel._tokens._NEVER)


# -- socket download ------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.slow
async def test_socket_download_stops_on_cancel(anyio_backend: str) -> None:
    cancelled, size, stopped = await socket_recipe.download_for(0.2)
    assert cancelled
    assert size > 0
    assert stopped < PROMPT


@pytest.mark.anyio
async def test_socket_download_completes_when_the_server_closes(anyio_backend: str) -> None:
    payload = bytes(range(256)) * 1000
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve_once() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.sendall(payload)

        server = threading.Thread(target=serve_once, name="test server")
        server.start()
        try:
            received: list[int] = [0]
            data = await bridgecancel.run_sync(socket_recipe.download, "127.0.0.1", port, received)
        finally:
            server.join(10)
    assert data == payload
    assert received[-1] == len(payload)


# -- process tree ---------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.slow
async def test_process_tree_is_stopped_on_cancel(anyio_backend: str, tmp_path: Path) -> None:
    cancelled, pids, stopped = await tree_recipe.run_tree_for(0.1, tmp_path / "pids")
    assert cancelled
    assert len(pids) == 3
    assert not any(tree_recipe.alive(pid) for pid in pids)
    # The stubborn grandchild ignored SIGTERM: it was killed after the 0.5 s grace.
    assert 0.4 < stopped < 0.5 + PROMPT


# -- the scripts run as documented --------------------------------------------------------


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("recipe_sqlite.py", "slow query cancelled: True"),
        ("recipe_socket_download.py", "download cancelled: True"),
        ("recipe_process_tree.py", "process tree cancelled: True"),
    ],
)
@pytest.mark.slow
def test_recipe_script_runs(script: str, expected: str) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert expected in result.stdout
    assert "STILL RUNNING" not in result.stdout
