"""Tests for bridgecancel.testing: the leak check, assert_cancels_within, the pytest plugin."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import anyio
import anyio.abc
import pytest

import bridgecancel
from bridgecancel.testing import LeakError, assert_cancels_within, check_no_leaks

PY = sys.executable


# -- check_no_leaks ---------------------------------------------------------------------


def test_a_clean_block_passes() -> None:
    with check_no_leaks(settle=0.1):
        thread = threading.Thread(target=lambda: None)
        thread.start()
        thread.join()


def test_a_thread_left_running_fails() -> None:
    release = threading.Event()
    thread = threading.Thread(target=release.wait, name="leaky")
    try:
        with pytest.raises(LeakError, match=r"threads .*leaky"), check_no_leaks(settle=0.1):
            thread.start()
    finally:
        release.set()
        thread.join()


def test_a_thread_that_ends_while_settling_passes() -> None:
    release = threading.Event()
    with check_no_leaks(settle=10):
        threading.Thread(target=release.wait).start()
        threading.Timer(0.05, release.set).start()


def test_ignored_thread_names_pass() -> None:
    release = threading.Event()
    thread = threading.Thread(target=release.wait, name="my pool 1")
    try:
        with check_no_leaks(settle=0.1, ignore_threads=["my pool"]):
            thread.start()
    finally:
        release.set()
        thread.join()


def test_a_child_process_left_running_fails() -> None:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with pytest.raises(LeakError, match="child processes") as info, check_no_leaks(settle=0.1):
            procs.append(subprocess.Popen(["sleep", "30"]))
        assert f"[{procs[0].pid}]" in str(info.value)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def test_a_child_left_unreaped_fails() -> None:
    procs: list[subprocess.Popen[bytes]] = []
    with pytest.raises(LeakError, match="child processes"), check_no_leaks(settle=0.1):
        procs.append(subprocess.Popen([PY, "-c", "pass"]))
    procs[0].wait()  # a zombie is a child nobody waited for


def test_the_block_s_own_error_propagates_unchecked() -> None:
    release = threading.Event()
    thread = threading.Thread(target=release.wait)

    def leak_and_fail() -> None:
        with check_no_leaks(settle=0.1):
            thread.start()
            raise ValueError("mine")

    try:
        with pytest.raises(ValueError, match="mine"):
            leak_and_fail()
    finally:
        release.set()
        thread.join()


@pytest.mark.anyio
async def test_a_running_job_fails(anyio_backend: str) -> None:
    release = threading.Event()

    async def leave_a_job_running(group: anyio.abc.TaskGroup) -> None:
        with check_no_leaks(settle=0.1):
            group.start_soon(lambda: bridgecancel.run_sync(release.wait))
            with anyio.fail_after(10):
                while not bridgecancel.statistics().threads.running:
                    await anyio.sleep(0.001)

    async with anyio.create_task_group() as group:
        with pytest.raises(LeakError, match="jobs still running"):
            await leave_a_job_running(group)
        release.set()


@pytest.mark.anyio
async def test_a_cancelled_job_leaves_nothing(anyio_backend: str) -> None:
    started = threading.Event()

    def job() -> None:
        started.set()
        bridgecancel.current_token().wait()

    with check_no_leaks(settle=5):
        async with anyio.create_task_group() as group:
            group.start_soon(bridgecancel.run_sync, job)
            await anyio.to_thread.run_sync(started.wait)
            group.cancel_scope.cancel()


# -- assert_cancels_within --------------------------------------------------------------


def test_sync_block_that_stops_on_the_token_passes() -> None:
    with assert_cancels_within(5.0, after=0.02) as source:
        source.token.sleep(30)
    assert source.cancel_called


def test_sync_block_cancelled_by_hand_passes() -> None:
    with assert_cancels_within(5.0) as source:
        source.cancel("by hand")
        source.token.check()


@pytest.mark.slow
def test_sync_block_that_stops_late_fails() -> None:
    def stop_late() -> None:
        with assert_cancels_within(0.05, after=0.01) as source:
            assert source.token.wait(10)
            threading.Event().wait(0.3)  # the work goes on after the cancel

    with pytest.raises(AssertionError, match=r"took .* s to stop"):
        stop_late()


def test_sync_block_that_ends_before_the_cancel_fails() -> None:
    with (
        pytest.raises(AssertionError, match="before it was cancelled"),
        assert_cancels_within(5.0, after=30),
    ):
        pass


def test_sync_block_errors_and_other_tokens_propagate() -> None:
    with pytest.raises(ValueError, match="mine"), assert_cancels_within(5.0, after=0.01):
        raise ValueError("mine")
    other = bridgecancel.CancelSource()
    other.cancel()

    def raise_for_another_token() -> None:
        with assert_cancels_within(5.0) as source:
            source.cancel()
            other.token.check()

    with pytest.raises(bridgecancel.Cancelled) as info:
        raise_for_another_token()
    assert info.value.token is other.token


def test_bad_seconds_are_refused() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        assert_cancels_within(-1)


@pytest.mark.anyio
async def test_async_block_with_a_cooperative_job_passes(anyio_backend: str) -> None:
    def job() -> None:
        bridgecancel.current_token().wait(30)
        bridgecancel.check_cancelled()

    async with assert_cancels_within(5.0, after=0.05):
        await bridgecancel.run_sync(job)


@pytest.mark.anyio
async def test_async_block_stops_a_job_waiting_on_its_token(anyio_backend: str) -> None:
    started = threading.Event()

    def job() -> None:
        started.set()
        bridgecancel.current_token().wait()
        bridgecancel.check_cancelled()

    async with assert_cancels_within(5.0) as source, anyio.create_task_group() as group:
        group.start_soon(bridgecancel.run_sync, job)
        await anyio.to_thread.run_sync(started.wait)
        source.cancel()


@pytest.mark.anyio
@pytest.mark.slow
async def test_async_block_with_a_job_ignoring_the_token_fails(anyio_backend: str) -> None:
    started = threading.Event()
    release = threading.Event()

    def job() -> None:
        started.set()
        release.wait(10)  # ignores its token until released

    async def stop_late() -> None:
        async with assert_cancels_within(0.05) as source, anyio.create_task_group() as group:
            group.start_soon(bridgecancel.run_sync, job)
            await anyio.to_thread.run_sync(started.wait)
            source.cancel()
            threading.Timer(0.3, release.set).start()

    with pytest.raises(AssertionError, match=r"took .* s to stop"):
        await stop_late()
    assert release.is_set()


@pytest.mark.anyio
async def test_async_block_that_ends_before_the_cancel_fails(anyio_backend: str) -> None:
    with pytest.raises(AssertionError, match="before it was cancelled"):
        async with assert_cancels_within(5.0, after=30):
            await anyio.sleep(0)


@pytest.mark.anyio
async def test_async_block_errors_propagate(anyio_backend: str) -> None:
    with pytest.raises(ValueError, match="mine"):
        async with assert_cancels_within(5.0, after=30):
            raise ValueError("mine")


# -- the pytest plugin ------------------------------------------------------------------

PLUGIN_TESTS = """
import threading

import pytest

RELEASE = threading.Event()


def test_leaks_without_asking() -> None:
    threading.Thread(target=RELEASE.wait, args=(10,), daemon=True).start()


def test_leaks_with_the_fixture(no_leaked_workers: None) -> None:
    threading.Thread(target=RELEASE.wait, args=(10,), daemon=True).start()


@pytest.mark.usefixtures("no_leaked_workers")
def test_clean_with_the_fixture() -> None:
    thread = threading.Thread(target=lambda: None)
    thread.start()
    thread.join()
"""


SETTLE = ["-o", "bridgecancel_leak_settle=0.2"]  # seconds the leak check waits for threads


CONFTEST = 'pytest_plugins = ["bridgecancel.testing"]\n'
PYTEST = [PY, "-m", "pytest"]
# pytest handed the module bridgecancel.testing itself as a plugin: what it does with a
# name that no installed entry point has (the package on the path but not installed, or
# a conftest's pytest_plugins on pytest releases that look such names up as modules). The
# fixtures must come through the module's own pytest_plugins.
PYTEST_GIVEN_THE_MODULE = [
    PY,
    "-c",
    "import sys, pytest, bridgecancel.testing as t; "
    "sys.exit(pytest.main(sys.argv[1:], plugins=[t]))",
]


@pytest.mark.parametrize(
    ("command", "load", "conftest", "autoload"),
    [
        # The pytest11 entry point of the installed package, and nothing else.
        pytest.param(PYTEST, [], "", True, id="entry-point"),
        # By hand, where entry points are not loaded by themselves.
        pytest.param(PYTEST, ["-p", "bridgecancel.testing"], "", False, id="-p"),
        # A conftest's pytest_plugins, where entry points are not loaded by themselves.
        pytest.param(PYTEST, [], CONFTEST, False, id="conftest"),
        pytest.param(PYTEST_GIVEN_THE_MODULE, [], "", False, id="the-module"),
        # Every way at once (as bridgecancel's own tests do): loaded once, no clash.
        pytest.param(PYTEST, ["-p", "bridgecancel.testing"], CONFTEST, True, id="all-at-once"),
    ],
)
@pytest.mark.slow
def test_the_plugin_provides_the_fixture_and_applies_nothing_unasked(
    tmp_path: Path, command: list[str], load: list[str], conftest: str, autoload: bool
) -> None:
    (tmp_path / "test_plugin.py").write_text(textwrap.dedent(PLUGIN_TESTS))
    if conftest:
        (tmp_path / "conftest.py").write_text(conftest)
    env = dict(os.environ)
    env.pop("PYTEST_DISABLE_PLUGIN_AUTOLOAD", None)
    if not autoload:
        env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    result = subprocess.run(
        [*command, "-p", "no:cacheprovider", *load, "-rA", *SETTLE, "test_plugin.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    assert "PASSED test_plugin.py::test_leaks_without_asking" in out
    assert "PASSED test_plugin.py::test_clean_with_the_fixture" in out
    assert "ERROR test_plugin.py::test_leaks_with_the_fixture" in out
    assert "LeakError: left behind: threads" in out


def test_importing_testing_loads_neither_pytest_nor_the_plugin_nor_the_process_pool() -> None:
    # The plugin imports bridgecancel.testing, never the other way round; idle_worker_pids
    # loads the process pool only when called.
    code = (
        "import sys, bridgecancel.testing\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pytest', '_pytest')"
        " or m in ('bridgecancel._pytest_plugin', 'bridgecancel._process._pool')))"
    )
    out = subprocess.run(
        [PY, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout.strip()
    assert out == "[]"
