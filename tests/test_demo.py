"""The demo (``python -m bridgecancel demo``) and the command line around it.

A few tests look inside the demo's private package (`bridgecancel._demo`): its list of
cases, and that its worker-side module imports no async library. The demo has no public
surface but the command line, which the other tests run.
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
import time

import pytest

from bridgecancel._demo import _cases, _main

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
    "executor: awaiting task cancelled": (
        "bridgecancel.ThreadPoolExecutor: thread stopped after",
        "concurrent.futures.ThreadPoolExecutor: caller back in",
    ),
    "celery: task waiting on its token": ("token fired", "revoke()"),
}
ANCHORS = {
    "asyncio": ("asyncio.to_thread", "anyio.to_process.run_sync"),
    "trio": ("anyio.to_thread.run_sync", "anyio.to_process.run_sync"),
}
PROGRESS_NAMES = [*EXPECTED, "web disconnect", "cluster cancel", "executor cancel", "celery cancel"]
PROMPT = 2.0  # generous bound, in seconds, for "stopped promptly" on a shared machine
WIDTH = 100  # columns: the demo's output must read in a terminal that wide
CELL_INDENT = len("  bridgecancel  ")  # where a wrapped value goes on


def _seconds(text: str) -> float:
    """The first duration in `text` ("12 ms" or "1.05 s"), in seconds."""
    found = re.search(r"([\d.]+) (ms|s)\b", text)
    assert found, text
    value = float(found.group(1))
    return value / 1000 if found.group(2) == "ms" else value


def _tables(stdout: str) -> dict[str, list[list[str]]]:
    """The demo's rows per backend, each as [case, settings, bridgecancel, anchor].

    Each case is a block: its name, then a labelled line per column (``settings`` only
    when there are some), a long value wrapped onto lines indented under its label.
    """
    tables: dict[str, list[dict[str, str]]] = {}
    blocks: list[dict[str, str]] | None = None  # the table being read, if any
    key = ""
    for line in stdout.splitlines():
        header = re.fullmatch(r"== (\w+) ==", line)
        labelled = re.fullmatch(r"  (settings|bridgecancel|anchor) +(.*)", line)
        if header:
            blocks = tables.setdefault(header.group(1), [])
        elif blocks is None:
            continue
        elif not line:
            blocks = None  # a table ends at a blank line
        elif labelled:
            key = labelled.group(1)
            blocks[-1][key] = labelled.group(2)
        elif line.startswith(" " * CELL_INDENT):
            blocks[-1][key] += " " + line.strip()
        else:
            blocks.append({"case": line, "settings": "-"})
    return {
        backend: [[b["case"], b["settings"], b["bridgecancel"], b["anchor"]] for b in blocks]
        for backend, blocks in tables.items()
    }


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


@pytest.mark.slow
def test_every_line_the_demo_prints_fits_100_columns(
    demo: tuple[subprocess.CompletedProcess[str], float],
) -> None:
    result, _ = demo
    lines = result.stdout.splitlines() + result.stderr.splitlines()
    wide = [line for line in lines if len(line) > WIDTH]
    assert not wide, f"{len(wide)} lines wider than {WIDTH} columns: {wide[:3]}"


# Rows as wide as the demo's widest (its web and Dask rows), and an error row.
WIDE_ROWS = [
    {
        "case": "web: client leaves mid-request",
        "backend": "asyncio",
        "settings": "hypercorn (trio worker) on 127.0.0.1, handler work 1.5 s",
        "bridgecancel": "CancelOnDisconnectMiddleware + run_sync: thread stopped 0.4 ms "
        "after the client left; no thread left",
        "anchor": "anyio.to_thread.run_sync, no middleware: thread ran on 1.50 s after the "
        "client left, to the end of its work",
    },
    {
        "case": "thread: token.sleep()",
        "backend": "asyncio",
        "settings": "-",
        "bridgecancel": "cooperative: caller back in 1 ms, thread stopped",
        "anchor": "asyncio.to_thread: caller back in 0 ms; thread ran on 499 ms",
    },
    {
        "case": "cluster cancel",
        "backend": "trio",
        "settings": "-",
        "bridgecancel": "error: OSError: " + " ".join(["a long message"] * 20),
        "anchor": "-",
    },
]


def test_the_table_fits_100_columns_and_keeps_every_cell() -> None:
    out = io.StringIO()
    _main._print_table(WIDE_ROWS, out)
    text = out.getvalue()
    assert max(len(line) for line in text.splitlines()) <= WIDTH
    cells = [[r[key] for key in _cases.ROW_KEYS if key != "backend"] for r in WIDE_ROWS]
    assert _tables(text) == {"asyncio": cells[:2], "trio": cells[2:]}


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


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_demo_help_says_what_the_demo_does_and_exits_0(flag: str) -> None:
    result = subprocess.run(
        [PY, "-m", "bridgecancel", "demo", flag], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python -m bridgecancel demo\n")
    for what in ("asyncio and then trio", "run_sync", "run_process", "anchor", "Dask"):
        assert what in result.stdout
    assert result.stderr == ""


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"]])
def test_help_fits_100_columns(argv: list[str]) -> None:
    result = subprocess.run([PY, "-m", "bridgecancel", *argv], capture_output=True, text=True)
    assert max(len(line) for line in result.stdout.splitlines()) <= WIDTH
