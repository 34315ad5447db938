"""The demo (``python -m bridgecancel demo``) and the command line around it.

A few tests look inside the demo's private package (`bridgecancel._demo`): its list of
cases, and that its worker-side module imports no async library. The demo has no public
surface but the command line, which the other tests run.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from bridgecancel._demo import _cases

PY = sys.executable

# How each case's bridgecancel side must end (the outcome counter that moved).
EXPECTED = {
    "thread: token.sleep()": "cooperative",
    "thread: CPU loop calling token.check()": "cooperative",
    "thread: ignores its token": "interrupted",
    "thread: blocking.queue_get()": "cooperative",
    "thread: blocking.recv() on loopback": "cooperative",
    "thread: blocking.run_subprocess(sleep)": "cooperative",
    "process: token.sleep()": "cooperative",
    "process: ignores its token": "interrupted",
    "process: ignores token and interrupt": "killed",
}
# The web, cluster and Celery rows say what stopped rather than an outcome counter.
OTHER_ROWS = {
    "web: client leaves mid-request": (
        "CancelOnDisconnectMiddleware + run_sync: thread stopped",
        "anyio.to_thread.run_sync, no middleware",
    ),
    "dask: task waiting on its token": ("token fired", "Future.cancel()"),
    "celery: task waiting on its token": ("token fired", "revoke()"),
}
ANCHORS = {
    "asyncio": ("asyncio.to_thread", "anyio.to_process.run_sync"),
    "trio": ("anyio.to_thread.run_sync", "anyio.to_process.run_sync"),
}
PROGRESS_NAMES = [*EXPECTED, "web disconnect", "cluster cancel", "celery cancel"]
PROMPT = 2.0  # generous bound, in seconds, for "stopped promptly" on a shared machine


def _seconds(text: str) -> float:
    """The first duration in `text` ("12 ms" or "1.05 s"), in seconds."""
    found = re.search(r"([\d.]+) (ms|s)\b", text)
    assert found, text
    value = float(found.group(1))
    return value / 1000 if found.group(2) == "ms" else value


def _tables(stdout: str) -> dict[str, list[list[str]]]:
    """The demo's table rows per backend, each split into its four columns."""
    tables: dict[str, list[list[str]]] = {}
    rows: list[list[str]] = []
    for line in stdout.splitlines():
        header = re.fullmatch(r"== (\w+) ==", line)
        if header:
            rows = tables.setdefault(header.group(1), [])
        elif line and not line.startswith(("case ", "bridgecancel:", "anchor:")):
            rows.append(re.split(r"\s{2,}", line))
    return tables


@pytest.fixture(scope="module")
def demo() -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    result = subprocess.run(
        [PY, "-m", "bridgecancel", "demo"], capture_output=True, text=True, timeout=120
    )
    return result, time.monotonic() - started


@pytest.mark.slow
def test_the_demo_runs_every_case_on_both_backends_and_exits_0(
    demo: tuple[subprocess.CompletedProcess[str], float],
) -> None:
    result, seconds = demo
    assert result.returncode == 0, result.stdout + result.stderr
    assert seconds < 30, f"the demo took {seconds:.1f} s"
    tables = _tables(result.stdout)
    assert sorted(tables) == ["asyncio", "trio"]
    for backend, rows in tables.items():
        assert [row[0] for row in rows] == [*EXPECTED, *OTHER_ROWS], backend
        for case, settings, ours, anchor in rows:
            where = f"{backend}: {case}"
            if case in OTHER_ROWS:
                assert ours.startswith(OTHER_ROWS[case][0]), where
                assert anchor.startswith(OTHER_ROWS[case][1]), where
                assert "ran on" in anchor, where
                continue
            assert ours.startswith(f"{EXPECTED[case]}: "), where
            worker = case.split(":")[0]
            assert anchor.startswith(ANCHORS[backend][worker == "process"]), where
            if worker == "process":
                assert settings == "interrupt_after=0.1, kill_after=0.2", where
            # The anchor's worker ran its whole job (0.5 s) after the cancel, one way or
            # another: the caller waited for it, or it ran on after the caller left.
            assert "ran on" in anchor or "ran to the end" in anchor, where
    assert "none is left running" in result.stdout


@pytest.mark.slow
def test_the_demo_rows_stop_promptly_and_escalate_on_time(
    demo: tuple[subprocess.CompletedProcess[str], float],
) -> None:
    result, _ = demo
    for backend, rows in _tables(result.stdout).items():
        took = {case: _seconds(ours) for case, _, ours, _ in rows}
        for case, seconds in took.items():
            assert seconds < PROMPT, f"{backend}: {case}"
        assert took["process: token.sleep()"] < 1.0
        # interrupt_after + kill_after: the kill comes no earlier than that.
        assert took["process: ignores token and interrupt"] >= 0.3
        assert took["thread: ignores its token"] >= 0.1


@pytest.mark.slow
def test_the_demo_shows_progress_on_stderr(
    demo: tuple[subprocess.CompletedProcess[str], float],
) -> None:
    result, _ = demo
    steps = [line for line in result.stderr.splitlines() if line.startswith("[")]
    total = 2 * len(PROGRESS_NAMES)
    assert steps[0].startswith(f"[1/{total}] asyncio: ")
    assert steps[-1].startswith(f"[{total}/{total}] trio: ")
    assert len(steps) == total


@pytest.mark.anyio
@pytest.mark.slow
async def test_a_case_returns_the_contract_row(anyio_backend: str) -> None:
    row = await _cases.CASES[0](anyio_backend)
    assert tuple(row) == _cases.ROW_KEYS
    assert row["backend"] == anyio_backend
    assert row["case"] == "thread: token.sleep()"
    assert row["bridgecancel"].startswith("cooperative: ")
    assert _seconds(row["bridgecancel"]) < PROMPT


def test_the_case_list_is_the_registry_of_async_cases() -> None:
    assert [_cases.describe(case) for case in _cases.CASES] == PROGRESS_NAMES

    async def web(backend: str) -> dict[str, str]:  # pragma: no cover - never run
        raise NotImplementedError

    assert _cases.describe(web) == "web"


def test_the_demo_package_does_not_import_anyio_for_worker_processes() -> None:
    code = (
        "import sys; import bridgecancel._demo._work; "
        "print(sorted(m for m in sys.modules if m.startswith('bridgecancel._demo')))"
    )
    result = subprocess.run([PY, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["['bridgecancel._demo',", "'bridgecancel._demo._work']"]


# -- the command line -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "a command is required"),
        (["nonsense"], "unknown command 'nonsense'"),
        (["demo", "--fast"], "demo takes no arguments"),
    ],
)
def test_usage_errors_go_to_stderr_with_exit_status_2(argv: list[str], message: str) -> None:
    result = subprocess.run([PY, "-m", "bridgecancel", *argv], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("usage: python -m bridgecancel {demo,bench}")
    assert message in result.stderr


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_goes_to_stdout_with_exit_status_0(flag: str) -> None:
    result = subprocess.run([PY, "-m", "bridgecancel", flag], capture_output=True, text=True)
    assert result.returncode == 0
    assert result.stdout.startswith("usage: python -m bridgecancel {demo,bench}")
    assert result.stderr == ""
