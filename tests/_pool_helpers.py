"""Functions tests/test_pool.py runs in worker processes (importable there)."""

from __future__ import annotations

import os
import subprocess
import sys
import time


def _start_grandchild() -> int:
    # In the worker's process group, as a job's child is unless it starts its own.
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    return child.pid


def _mark(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def grandchild_then_ignore_token(marker: str) -> None:
    """Start a grandchild, then ignore the token until interrupted."""
    _mark(marker, f"{os.getpid()} {_start_grandchild()}")
    while True:
        time.sleep(0.01)


def grandchild_then_return(marker: str) -> int:
    """Start a grandchild and return normally, leaving it running."""
    grandchild = _start_grandchild()
    _mark(marker, f"{os.getpid()} {grandchild}")
    return grandchild


def pid() -> int:
    return os.getpid()
