"""Run every demo case on every backend, with a progress line, and print the table."""

from __future__ import annotations

import importlib.util
import logging
import sys
import textwrap
from typing import Final, TextIO

import anyio

from .._supervise import statistics
from ._cases import CASES, ROW_KEYS, Case, describe

__all__ = ("main",)


class _Progress:
    """One line on stderr: rewritten in place on a terminal, else a line per step."""

    def __init__(self, total: int, stream: TextIO) -> None:
        self.total = total
        self.count = 0
        self.stream = stream
        self.in_place = stream.isatty()

    def step(self, what: str) -> None:
        self.count += 1
        line = f"[{self.count}/{self.total}] {what}"
        if self.in_place:
            self.stream.write(f"\r\x1b[K{line}")
        else:
            self.stream.write(f"{line}\n")
        self.stream.flush()

    def close(self) -> None:
        if self.in_place:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def _run_case(case: Case, backend: str) -> tuple[dict[str, str], bool]:
    """The case's row, and whether it ran (an error becomes a row of its own)."""
    try:
        row = anyio.run(case, backend, backend=backend)
        if set(row) != set(ROW_KEYS):
            raise ValueError(f"the case returned a row with keys {sorted(row)}")
    except Exception as exc:
        error = f"error: {type(exc).__name__}: {exc}"
        name = describe(case)
        return {
            "case": name,
            "backend": backend,
            "settings": "-",
            "bridgecancel": error,
            "anchor": "-",
        }, False
    return row, True


WIDTH: Final = 100
"""The widest line the table prints: it stays readable in a 100-column terminal."""

_LABEL: Final = max(len(key) for key in ROW_KEYS)


def _print_table(rows: list[dict[str, str]], out: TextIO) -> None:
    """Each backend's cases, one block per case: its name, then a line per column.

    A case's cells are long sentences, too long to sit side by side in a terminal: each
    is a labelled line of its own (``settings`` only when there are some), wrapped to
    `WIDTH` columns under its label.
    """
    indent = " " * (2 + _LABEL + 2)
    for backend in dict.fromkeys(row["backend"] for row in rows):
        print(f"== {backend} ==", file=out)
        for row in rows:
            if row["backend"] != backend:
                continue
            print(textwrap.fill(row["case"], WIDTH, subsequent_indent="    "), file=out)
            for key in ROW_KEYS:
                if key in ("case", "backend") or (key == "settings" and row[key] == "-"):
                    continue
                label = f"  {key.ljust(_LABEL)}  "
                text = textwrap.fill(
                    row[key], WIDTH, initial_indent=label, subsequent_indent=indent,
                    break_on_hyphens=False,
                )
                print(text, file=out)
        print(file=out)


def main() -> int:
    """Run the demo; return the exit status (0: every case ran and nothing is left)."""
    # The table shows how each job ended; the WARNING records would repeat it.
    logging.getLogger("bridgecancel").addHandler(logging.NullHandler())
    backends = ["asyncio"]
    if importlib.util.find_spec("trio") is not None:
        backends.append("trio")
    else:
        print(
            "trio is not installed (pip install -e '.[trio]' from a checkout): asyncio only",
            file=sys.stderr,
        )
    progress = _Progress(len(CASES) * len(backends), sys.stderr)
    rows: list[dict[str, str]] = []
    ok = True
    for backend in backends:
        for case in CASES:
            progress.step(f"{backend}: {describe(case)}")
            row, ran = _run_case(case, backend)
            rows.append(row)
            ok = ok and ran
    progress.close()
    _print_table(rows, sys.stdout)
    left = statistics()
    if left.threads.running or left.processes.running:
        print(textwrap.fill(f"jobs still running after the demo: {left}", WIDTH))
        return 1
    print(
        "bridgecancel: every job stopped when its scope was cancelled; none is left running.\n"
        "anchor: the same job, cancelled the same way, under what asyncio and anyio offer today."
    )
    return 0 if ok else 1
