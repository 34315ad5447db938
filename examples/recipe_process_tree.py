"""Recipe: stop a child process and everything it started when the scope is cancelled.

    python examples/recipe_process_tree.py

``bridgecancel.blocking.run_subprocess`` is ``subprocess.run`` that also waits on the
token. It starts the child in a session of its own, so that on cancel the whole process
group gets SIGTERM, then SIGKILL after `grace` seconds for whatever is left, and
``Cancelled`` is raised only once the child is reaped and the group is empty: no
grandchild outlives the scope.

Here the child starts two grandchildren, one of which ignores SIGTERM, and sleeps.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import anyio

from bridgecancel import blocking, run_sync

TREE = """
import os, signal, subprocess, sys, time
stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
kids = [
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]),
    subprocess.Popen([sys.executable, "-c", stubborn]),
]
time.sleep(0.3)  # let the stubborn one install its handler
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(" ".join(str(p) for p in [os.getpid()] + [k.pid for k in kids]))
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(60)
"""


def alive(pid: int) -> bool:
    """Whether `pid` is running (a zombie waiting to be reaped by init counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def run_tree(pids_file: str) -> None:
    """Run the process tree in the worker thread until the token fires."""
    blocking.run_subprocess([sys.executable, "-c", TREE, pids_file], grace=0.5)


async def run_tree_for(seconds: float, pids_file: Path) -> tuple[bool, list[int], float]:
    """Run the tree, cancel once it is up and `seconds` have passed.

    Returns whether the scope was cancelled, the tree's pids, and the seconds from the
    cancel to the worker's exit.
    """
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as group:
            group.start_soon(run_sync, run_tree, str(pids_file))
            while not pids_file.exists():
                await anyio.sleep(0.01)
            await anyio.sleep(seconds)
            cancelled_at = time.perf_counter()
            scope.cancel()
    stopped = time.perf_counter() - cancelled_at
    return scope.cancelled_caught, [int(p) for p in pids_file.read_text().split()], stopped


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cancelled, pids, stopped = await run_tree_for(0.2, Path(tmp) / "pids")
    print(f"process tree cancelled: {cancelled}; the worker stopped after {stopped:.2f} s")
    print("(the stubborn grandchild ignored SIGTERM and was killed after the 0.5 s grace)")
    for role, pid in zip(("child", "grandchild", "stubborn grandchild"), pids, strict=False):
        print(f"  {role} {pid}: {'STILL RUNNING' if alive(pid) else 'gone'}")


if __name__ == "__main__":
    anyio.run(main)
