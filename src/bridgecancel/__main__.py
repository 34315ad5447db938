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


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "demo":
        from ._demo import main as demo

        return demo()
    if command == "bench":
        return _bench(rest)
    print(f"unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
