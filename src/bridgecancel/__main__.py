"""Command line: ``python -m bridgecancel demo`` or ``python -m bridgecancel bench``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

USAGE = """usage: python -m bridgecancel {demo,bench}

  demo   cancel blocking work in threads, processes, a web request and a Dask task the
         moment it runs, on asyncio and trio, beside the same work under asyncio, anyio
         or Dask alone, and show how each ended (about 20 s; demo --help says more)
  bench  run the benchmarks, quick by default (needs a checkout: benchmarks/run.py;
         extra args are passed on: --full, an area such as threads, --check)
"""

DEMO_USAGE = """usage: python -m bridgecancel demo

Runs real blocking jobs and cancels each the moment it runs, on asyncio and then trio
(about 20 s), and prints how each ended:

  thread jobs    run_sync: a token.sleep(), a CPU loop calling token.check(), a job that
                 ignores its token (interrupted), and bridgecancel.blocking waits on a
                 queue, a socket and a subprocess
  process jobs   run_process: one that stops at its token, one that ignores it
                 (interrupted) and one that ignores the interrupt too (killed)
  web            a client leaves mid-request under uvicorn (asyncio) or hypercorn (trio),
                 with CancelOnDisconnectMiddleware (needs the 'web' extra)
  dask           a task on a local Dask cluster (needs the 'dask' extra)

Beside each ("anchor"), the same job cancelled the same way under what asyncio, anyio or
Dask offers alone: asyncio.to_thread, anyio.to_thread.run_sync, anyio.to_process.run_sync,
Future.cancel(). Cases whose extra is missing say so and are skipped; trio is used only if
installed. From the root of a checkout: python -m pip install -e ".[trio,web,dask]"

Exit status 0 if every case ran and no job is left running, 1 otherwise.
"""


def _bench(args: list[str]) -> int:
    """Run ``benchmarks/run.py`` (quick unless ``--full``) from a checkout."""
    checkout = Path(__file__).resolve().parents[2]  # src/bridgecancel/ -> the checkout
    for folder in (Path.cwd(), checkout):
        script = folder / "benchmarks" / "run.py"
        if script.exists():
            return subprocess.call([sys.executable, str(script), *args])
    print(
        "benchmarks/run.py not found: run this from a bridgecancel checkout "
        "(the benchmarks are not installed with the package)",
        file=sys.stderr,
    )
    return 2


def _usage_error(message: str) -> int:
    """As argparse does: usage and the error on stderr, exit status 2."""
    print(f"{USAGE}\npython -m bridgecancel: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str]) -> int:
    if not argv:
        return _usage_error("a command is required (demo or bench)")
    command, rest = argv[0], argv[1:]
    if command in ("-h", "--help"):
        print(USAGE)
        return 0
    if command == "demo":
        if rest in (["-h"], ["--help"]):
            print(DEMO_USAGE)
            return 0
        if rest:
            return _usage_error(f"demo takes no arguments, got {' '.join(rest)!r}")
        from ._demo._main import main as demo

        return demo()
    if command == "bench":
        return _bench(rest)
    return _usage_error(f"unknown command {command!r} (choose demo or bench)")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
