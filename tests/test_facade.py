"""Tests for the package facade (`bridgecancel/__init__.py`): lazy, typed, public names.

Issue 7, defects 5 and 7: importing bridgecancel for its tokens costs no anyio, a worker
process stays free of async libraries, and public objects report the public module.
One test reads a worker's command line, which names the worker's private entry point
(`bridgecancel._process._child`): that a worker starts by a plain import is the point.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import os
import subprocess
import sys

import pytest

import _proc_lean
import bridgecancel
import bridgecancel.testing
from bridgecancel import run_process

_TOKEN_NAMES = (
    "BrokenWorkerError",
    "CancelSource",
    "CancelToken",
    "Cancelled",
    "Registration",
    "RemoteTraceback",
    "any_of",
    "check_cancelled",
    "current_token",
)


def _fresh_python(code: str) -> str:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout.strip()


def test_version_matches_the_installed_metadata() -> None:
    assert bridgecancel.__version__ == importlib.metadata.version("bridgecancel")


def test_idle_worker_pids_lives_in_testing() -> None:
    assert "idle_worker_pids" not in bridgecancel.__all__
    assert "idle_worker_pids" in bridgecancel.testing.__all__
    assert isinstance(bridgecancel.testing.idle_worker_pids(), set)


def test_public_objects_report_the_public_module() -> None:
    for name in bridgecancel.__all__:
        obj = getattr(bridgecancel, name)
        assert obj.__module__ == "bridgecancel", name
    assert repr(bridgecancel.Cancelled) == "<class 'bridgecancel.Cancelled'>"
    with pytest.raises(TypeError, match=r"bridgecancel\.Cancelled has no public constructor"):
        bridgecancel.Cancelled(None, "x")


def test_importing_the_package_for_tokens_loads_no_async_library() -> None:
    out = _fresh_python(
        "import sys; from bridgecancel import CancelSource, current_token, Cancelled\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('anyio', 'asyncio', 'trio', 'ctypes')))"
    )
    assert out == "[]"


def test_anyio_backed_names_load_on_first_use() -> None:
    out = _fresh_python(
        "import sys, bridgecancel\n"
        "before = 'anyio' in sys.modules\n"
        "from bridgecancel import run_sync\n"
        "print(before, 'anyio' in sys.modules, run_sync.__module__, 'ctypes' in sys.modules)"
    )
    assert out == "False True bridgecancel False"  # ctypes only for interrupt_after


def test_star_import_gives_every_public_name() -> None:
    namespace: dict[str, object] = {}
    exec("from bridgecancel import *", namespace)
    assert set(bridgecancel.__all__) <= set(namespace)


def test_unknown_attribute_raises_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        bridgecancel.nope  # noqa: B018
    assert "run_sync" in dir(bridgecancel)


def test_lazy_names_are_typed_for_type_checkers() -> None:
    source = inspect.getsource(bridgecancel)
    for name in set(bridgecancel.__all__) - set(_TOKEN_NAMES):
        assert f"import {name} as {name}" in source, name


@pytest.mark.anyio
async def test_worker_process_never_imports_an_async_library() -> None:
    # The job's module does `from bridgecancel import current_token`, as the README shows.
    assert await run_process(_proc_lean.async_libraries_loaded) == []


@pytest.mark.anyio
async def test_worker_process_starts_by_a_plain_import() -> None:
    pid = await run_process(os.getpid)
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = f.read().split(b"\0")
    command = argv.index(b"-c")
    assert argv[1:command] == ([b"-P"] if sys.version_info >= (3, 11) else [])  # safe path
    assert b"from bridgecancel._process._child import main\n" in argv[command + 1]
    # The package in the worker is the real one, with its facade (not built by hand).
    names = await run_process(_proc_lean.package_facade)
    assert names == ["__all__", "__getattr__", "__version__"]
