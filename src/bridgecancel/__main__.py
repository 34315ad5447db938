"""Command line: ``python -m bridgecancel demo`` or ``python -m bridgecancel bench``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

USAGE = """usage: python -m bridgecancel {demo,bench}

  demo   cancel thread and process work on asyncio and trio, and show how it ended
  bench  run the benchmarks, quick by default (needs a checkout: benchmarks/run.py;
         extra args are passed on: --full, an area such as threads, --check)
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
        if rest:
            return _usage_error(f"demo takes no arguments, got {' '.join(rest)!r}")
        from ._demo._main import main as demo

        return demo()
    if command == "bench":
        return _bench(rest)
    return _usage_error(f"unknown command {command!r} (choose demo or bench)")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
